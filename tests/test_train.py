"""End-to-end: the same `main(cfg)` on one process and under torchrun, checkpoints and resume across world sizes."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
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
    for point in ("untrained", "warmup", "final"):  # each evaluation point leaves its pictures
        assert (run / "pictures" / f"{point}_retrieval.png").is_file()
        assert (run / "pictures" / f"{point}_camera_mAP.png").is_file()
    assert set(saved["final"]["camera_mAP"]) == {"c001", "c002", "c003", "c004"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert {"eval/retrieval", "eval/camera_mAP"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("eval/retrieval")] == [0, 1, 2]  # untrained, end of warm-up, final


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


INVARIANCE = ["train.epochs=2", "train.warmup_epochs=1", "train.steps_per_epoch=4", "train.batch_size=12",
              "augment.rotation=5", "augment.hue=0.05", "augment.blur=0.3"]  # every random augmentation on
# float64 separates the implementation from float32 rounding. In float32 the 1e-7 differences of another summation
# order are amplified by the non-smooth parts of the network (near-ties of ReLU and max-pooling reroute gradients):
# after one step 2 ranks differ from 1 by ~2e-7 and 4 ranks by ~6e-4, more after each step (README).
FLOAT64_TOLERANCE = 1e-9  # max |difference| of any parameter / BN buffer / memory entry after 8 steps
FLOAT32_TOLERANCE = 3e-3  # the same after one float32 step (measured 6e-4 with 4 ranks)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The same config trained uninterrupted on 1, 2 and 4 ranks (float64), from a 2-rank epoch-1 checkpoint
    resumed on 1 and 4 ranks (memory saved by global row id), and one float32 step on 1 and 4 ranks."""
    tmp = tmp_path_factory.mktemp("worlds")
    base = TINY + [f"data.root={tmp / 'synth'}"] + INVARIANCE
    runs, logs = {}, {}
    for ranks in (1, 2, 4):
        runs[ranks] = tmp / f"r{ranks}"
        logs[ranks] = torchrun(ranks, base + ["train.dtype=float64", f"output_dir={runs[ranks]}"]).stdout
    torchrun(2, base + ["train.dtype=float64", f"output_dir={tmp / 'half'}", "train.epochs=1"])
    for ranks in (1, 4):
        out = runs[f"from2to{ranks}"] = tmp / f"from2to{ranks}"
        shutil.copytree(tmp / "half", out)
        logs[f"from2to{ranks}"] = torchrun(ranks, base + ["train.dtype=float64", f"output_dir={out}"]).stdout
    for name, extra in (("per_rank_epoch1", ["train.epochs=1"]), ("per_rank", ["memory.refresh_every=1"])):
        runs[name] = tmp / name
        torchrun(2, base + ["train.dtype=float64", "model.batchnorm=per_rank", f"output_dir={runs[name]}", *extra])
    for ranks in (1, 4):
        out = runs[f"float32 r{ranks}"] = tmp / f"float32_r{ranks}"
        torchrun(ranks, base + ["train.epochs=1", "train.steps_per_epoch=1", f"output_dir={out}"])
    return runs, logs


def trained_state(run) -> dict:
    """Final model parameters and BN buffers, and the memory rows by global id, of a finished run."""
    state = dict(torch.load(run / "final_model.pt", weights_only=False)["model"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    shards = [torch.load(p, weights_only=True) for p in sorted((run / ckpt["memory_dir"]).glob("memory_rank*.pt"))]
    ids = torch.cat([s["global_ids"] for s in shards])
    rows = torch.cat([s["rows"] for s in shards])
    memory = torch.empty_like(rows)
    memory[ids] = rows
    state["memory rows"] = memory
    return state


def largest_difference(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(((float((a[k].double() - b[k].double()).abs().max()), k) for k in a if a[k].numel()))
    return worst


@pytest.mark.parametrize("run", [2, 4, "from2to1", "from2to4"])
def test_one_two_and_four_ranks_train_the_same_model_and_memory(worlds, run):
    runs, logs = worlds
    reference, other = trained_state(runs[1]), trained_state(runs[run])
    assert any("running_mean" in k for k in reference)  # BatchNorm buffers are compared too
    difference, where = largest_difference(reference, other)
    assert difference <= FLOAT64_TOLERANCE, (difference, where)
    assert f"{run if isinstance(run, int) else run[-1]} rank(s)" in logs[run]


def test_float32_training_on_four_ranks_follows_one_rank_within_rounding(worlds):
    runs, _ = worlds
    difference, where = largest_difference(trained_state(runs["float32 r1"]), trained_state(runs["float32 r4"]))
    assert difference <= FLOAT32_TOLERANCE, (difference, where)


@pytest.mark.parametrize("run", [2, 4, "from2to1", "from2to4"])
def test_one_two_and_four_ranks_give_the_same_losses_and_evaluation(worlds, run):
    runs, _ = worlds
    reference = json.loads((runs[1] / "metrics.json").read_text())
    other = json.loads((runs[run] / "metrics.json").read_text())
    for key in ("warmup", "final") if isinstance(run, int) else ("final",):
        for metric in ("mAP", "rank1", "rank5", "rank10"):
            assert abs(reference[key][metric] - other[key][metric]) <= 1e-9, (key, metric)
    for mine, theirs in zip(reference["epochs"], other["epochs"], strict=True):
        for part in ("loss", "intra", "inter", "cam", "hard_positive_precision", "easy_positive_precision"):
            assert (mine.get(part) is None) == (theirs.get(part) is None), part
            if part in mine:
                assert abs(mine[part] - theirs[part]) <= 1e-9 * max(1.0, abs(mine[part])), (mine["epoch"], part)


def test_per_rank_batchnorm_fills_the_memory_of_every_rank_with_the_merged_statistics(worlds):
    """model.batchnorm=per_rank: before the epoch-1 memory refresh the ranks' BN statistics are merged, so every
    rank's rows are embedded by one model — the one the epoch-1 checkpoint stores (float64, exact)."""
    from reid.config import load_config as config
    from reid.data.images import eval_transform
    from reid.data.readers import load_dataset
    from reid.data.sampler import GlobalBatchSampler
    from reid.features import extract_features
    from reid.model import build_model

    runs, _ = worlds
    cfg = config(str(runs["per_rank"] / "config.yaml"))
    train = load_dataset("veri776", cfg.data.root).train
    sampler = GlobalBatchSampler(train.cams, cfg.train.batch_size, cfg.seed, max_steps=cfg.train.steps_per_epoch)
    updated = np.concatenate([sampler.global_batch(1, step)[0] for step in range(len(sampler))])
    untouched = np.setdiff1d(np.arange(len(train)), updated)  # rows as the epoch-1 refresh left them
    model = build_model(cfg.model).double()
    model.load_state_dict(torch.load(runs["per_rank_epoch1"] / "checkpoint.pt", weights_only=False)["model"])
    paths = [train.paths[i] for i in untouched]
    expected = extract_features(model, paths, eval_transform(cfg.data.height, cfg.data.width))
    filled = trained_state(runs["per_rank"])["memory rows"][untouched]
    assert float((filled - expected).abs().max()) <= FLOAT64_TOLERANCE
    assert largest_difference(trained_state(runs["per_rank"]), trained_state(runs[2]))[0] > 1e-3  # another recipe


def test_the_log_names_the_global_batch_and_each_ranks_share(worlds):
    _, logs = worlds
    assert "global batch 12 images, 4 steps/epoch" in logs[4]
    assert all(f"rank {r} " in logs[4] for r in range(4))
    assert "resumed from epoch 1" in logs["from2to4"] and "resumed from epoch 1" in logs["from2to1"]


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
