from setuptools import find_packages, setup

setup(
    # "reid" on the package index is another project: ours installs as ctacl-reid, imports as reid and runs as `reid`.
    name="ctacl-reid",
    version="0.1.0",
    description="Distributed camera-tracklet-aware contrastive learning (CTACL) "
    "for unsupervised vehicle re-identification",
    python_requires=">=3.10",
    packages=find_packages(include=["reid", "reid.*"]),  # launch/ holds scripts, not an installed package
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "pillow",
        "faiss-cpu",
        "submitit",
        "tensorboard",
        "pyyaml",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["reid = reid.cli:main"]},
)
