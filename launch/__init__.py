"""Launchers around the one `reid.train.main(cfg)`: SLURM through submitit (`launch.submit`)."""
