"""`reid evaluate`: the same numbers from 1 process and from 2 torchrun ranks that each embed a share, and
VeRi-Wild's three protocols from one embedding pass (issue 12 items 1 and 3)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from reid.config import config_to_dict, load_config
from reid.model import ReidNet
from reid.train import evaluate_checkpoint
from tests.dist_workers import free_port

pytestmark = pytest.mark.timeout(300)
SMALL = ["model.arch=resnet18", "data.height=32", "data.width=32", "data.workers=0", "eval.flip=false",
         "eval.batch_size=4", "device=cpu"]


def checkpoint(tmp_path, overrides):
    """A random-weight checkpoint in the training format (model state + config)."""
    cfg = load_config(None, SMALL + overrides)
    torch.manual_seed(0)
    model = ReidNet(cfg.model.arch, cfg.model.last_stride)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return str(path)


def run_evaluate(args, ranks=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                 f"--master_port={free_port()}"] if ranks else [sys.executable])
    done = subprocess.run(launcher + ["-m", "reid", "evaluate", *args], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_two_ranks_embedding_shares_give_the_one_process_numbers_printed_once(tmp_path):
    from reid.data.synthetic import ensure_synthetic

    cfg = load_config("configs/synthetic.yaml", ["synth.identities=12", "synth.test_identities=6", "synth.cameras=4",
                                                  "synth.height=32", "synth.width=32", f"data.root={tmp_path / 's'}"])
    ensure_synthetic(cfg.data.root, cfg.synth)
    path = checkpoint(tmp_path, ["data.format=veri776", f"data.root={tmp_path / 's'}"])
    one = json.loads(run_evaluate(["--checkpoint", path]))
    out = run_evaluate(["--checkpoint", path], ranks=2)
    assert out.count('"mAP"') == 1  # rank 0 prints; the other rank only embeds
    two = json.loads(out[out.index("{"):])
    assert one.keys() == two.keys() and one["valid_queries"] > 0
    for key in one:
        assert abs(one[key] - two[key]) <= 1e-6, key


def write_veriwild(root):
    """4 vehicles × 3 cameras × 2 images; the three protocols' lists are nested subsets of the test vehicles."""
    lines = []
    for v in range(1, 7):
        for cam in range(3):
            for k in range(2):
                name = f"{v:05d}/{v:02d}{cam}{k}"
                os.makedirs(root / "images" / f"{v:05d}", exist_ok=True)
                Image.new("RGB", (12, 10), (40 * v % 256, 80 * cam, 60 * k + 20 * v)).save(
                    root / "images" / f"{name}.jpg")
                lines.append((name, f"c{cam}"))
    split = root / "train_test_split"
    os.makedirs(split, exist_ok=True)
    (split / "vehicle_info.txt").write_text("id/image;Camera ID;Time;Model;Type;Color\n" + "".join(
        f"{n};{c};2018-03-11 10:05:04;Audi;SUV;Black\n" for n, c in lines))
    train = [n for n, _ in lines if int(n[:5]) <= 2]
    test = [n for n, _ in lines if int(n[:5]) > 2]
    (split / "train_list.txt").write_text("".join(n + "\n" for n in train))
    for size, vehicles in ((3000, 2), (5000, 3), (10000, 4)):
        gallery = [n for n in test if int(n[:5]) <= 2 + vehicles]
        query = [n for n in gallery if n.endswith("0")][::2]
        (split / f"test_{size}.txt").write_text("".join(n + "\n" for n in gallery))
        (split / f"test_{size}_query.txt").write_text("".join(n + "\n" for n in query))
    return root


def test_protocol_all_scores_small_medium_and_large_as_three_separate_evaluations(tmp_path, capsys):
    root = write_veriwild(tmp_path / "wild")
    path = checkpoint(tmp_path, ["data.format=veriwild", f"data.root={root}"])
    every = evaluate_checkpoint(path, ["data.protocol=all"])
    assert list(every) == ["small", "medium", "large"]
    table = capsys.readouterr().out
    assert all(name in table for name in ("small", "medium", "large"))
    for protocol in ("small", "medium", "large"):
        alone = evaluate_checkpoint(path, [f"data.protocol={protocol}"])
        assert every[protocol] == pytest.approx(alone, abs=1e-6), protocol
    assert every["small"]["valid_queries"] < every["large"]["valid_queries"]


def test_protocol_all_is_refused_for_training_and_for_other_formats(tmp_path):
    from reid.errors import ReidError
    from reid.train import main

    with pytest.raises(ReidError, match="data.protocol.*veriwild"):
        load_config(None, ["data.protocol=all"])
    root = write_veriwild(tmp_path / "wild")
    with pytest.raises(ReidError, match="all is for `reid evaluate`"):
        main(load_config(None, SMALL + ["data.format=veriwild", f"data.root={root}", "data.protocol=all",
                                        f"output_dir={tmp_path / 'run'}"]))
