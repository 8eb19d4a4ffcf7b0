"""End-to-end: the same `main(cfg)` on one process and under torchrun, checkpoints and resume across world sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from reid.config import load_config
from reid.train import main

TINY = ["synth.identities=16", "synth.test_identities=8", "synth.cameras=4", "synth.height=32", "synth.width=32",
        "data.height=32", "data.width=32", "model.arch=resnet18", "train.batch_size=16", "train.steps_per_epoch=3",
        "data.workers=0", "eval.batch_size=64", "eval.every=0", "eval.picture_queries=3", "memory.refresh_every=2",
        "device=cpu"]


def tiny_config(tmp_path, *extra):
    return load_config("configs/synthetic.yaml", TINY + [f"data.root={tmp_path / 'synth'}",
                                                          f"output_dir={tmp_path / 'run'}", *extra])


def test_single_process_run_writes_every_artefact(tmp_path):
    metrics = main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1"))
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "final_model.pt", "metrics.json", "retrieval.png", "config.yaml"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("untrained", "warmup", "final"):
        assert 0.0 <= saved[key]["mAP"] <= 1.0 and 0.0 <= saved[key]["rank1"] <= 1.0
    assert saved["final"] == metrics["final"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))
    assert len(saved["epochs"]) == 2 and saved["epochs"][1]["warmup"] is False


def test_resume_continues_from_the_checkpoint_not_from_scratch(tmp_path, capsys):
    main(tiny_config(tmp_path, "train.epochs=1", "train.warmup_epochs=1"))
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert first["epoch"] == 1
    main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1"))
    out = capsys.readouterr().out
    assert "resumed from epoch 1" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 2


def torchrun(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "reid", "train", "--config", "configs/synthetic.yaml", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_two_ranks_train_evaluate_then_resume_with_one_and_four_ranks(tmp_path):
    """One epoch on 2 camera shards; the checkpoint (memory by global row id) resumes on 1 and on 4 ranks."""
    base = TINY + [f"data.root={tmp_path / 'synth'}", "train.warmup_epochs=1"]
    two = torchrun(2, base + [f"output_dir={tmp_path / 'r2'}", "train.epochs=1"])
    assert "2 rank(s)" in two.stdout
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["mAP"] <= 1.0
    ckpt = torch.load(tmp_path / "r2" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1

    for ranks in (1, 4):
        out = tmp_path / f"from2to{ranks}"
        subprocess.run(["cp", "-r", str(tmp_path / "r2"), str(out)], check=True)
        result = torchrun(ranks, base + [f"output_dir={out}", "train.epochs=2"])
        assert "resumed from epoch 1" in result.stdout
        assert f"{ranks} rank(s)" in result.stdout
        assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_ablation_rows_from_the_shared_warmup_equal_rows_that_retrain_it(tmp_path):
    """`reid ablate --share-warmup` claims the same table as retraining the warm-up per row: check one row."""
    from reid.ablate import main as ablate

    common = TINY + [f"data.root={tmp_path / 'synth'}", "train.epochs=2", "train.warmup_epochs=1"]
    ablate(["--rows", "full", "--share-warmup", *common, f"output_dir={tmp_path / 'shared'}"])
    ablate(["--rows", "full", *common, f"output_dir={tmp_path / 'own'}"])
    shared = json.loads((tmp_path / "shared" / "ablation" / "full" / "metrics.json").read_text())
    own = json.loads((tmp_path / "own" / "ablation" / "full" / "metrics.json").read_text())
    assert shared["final"] == own["final"] and shared["warmup"] == own["warmup"]
    assert [e["loss"] for e in shared["epochs"]] == [e["loss"] for e in own["epochs"]]
