"""Faults a long run meets, each named in one line and losing nothing (issue 13 items 5, 6, 7)."""
import pytest
import torch

from reid.errors import ReidError
from reid.train import main
from tests.test_train import tiny_config


def test_an_output_folder_that_cannot_be_created_is_one_line_before_any_training(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    cfg.output_dir = "/proc/forbidden/run"
    with pytest.raises(ReidError, match=r"output_dir '/proc/forbidden/run': cannot be created or written") as err:
        main(cfg)
    assert "\n" not in str(err.value)


def test_a_disk_without_room_for_one_checkpoint_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    import shutil

    from reid import checkpoint

    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=3 * 2**20))  # 3 MiB left
    with pytest.raises(ReidError, match=r"3 MiB free, expected room for one checkpoint \(about \d+ MiB"):
        main(tiny_config(tmp_path, "train.epochs=1"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def nan_at_call(monkeypatch, call: int):
    """Make the training loss NaN at its `call`-th evaluation (1-based)."""
    import reid.train

    real, calls = reid.train.sharded_ctacl_loss, []

    def loss(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(reid.train, "sharded_ctacl_loss", loss)


def test_a_nan_loss_stops_naming_epoch_step_and_rank_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 5)  # 3 steps per epoch: epoch 1, step 1
    with pytest.raises(ReidError, match=r"non-finite loss at epoch 1 step 1 on rank\(s\) \[0\].*skip_nonfinite"):
        main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1"))
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert kept["epoch"] == 1  # epoch 0's checkpoint, complete, untouched


def test_skip_nonfinite_drops_the_step_and_counts_it(tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 5)
    metrics = main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1", "train.skip_nonfinite=true"))
    assert [e.get("skipped_steps", 0) for e in metrics["epochs"]] == [0, 1]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in metrics["epochs"])


def test_resume_refuses_another_model_and_logs_harmless_changes(tmp_path, capsys):
    main(tiny_config(tmp_path, "train.epochs=1", "train.warmup_epochs=1"))
    with pytest.raises(ReidError, match=r"e0001.pt: the checkpoint was trained with other data or another "
                                        r"model \(model.last_stride: 2 → 1\)"):
        main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1", "model.last_stride=1"))
    capsys.readouterr()
    main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1", "eval.picture_queries=2"))
    out = capsys.readouterr().out
    assert "resuming with a changed config: eval.picture_queries: 3 → 2; train.epochs: 1 → 2" in out
    assert "resumed from epoch 1" in out


def run3(tmp_path, *extra):
    return main(tiny_config(tmp_path, "train.warmup_epochs=1", "memory.refresh_every=5", *extra))


def test_checkpoints_are_manifested_the_newest_two_kept_and_checkpoint_pt_links_the_newest(tmp_path):
    run3(tmp_path, "train.epochs=3")
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["e0002.json", "e0002.pt", "e0002_memory",
                                                         "e0003.json", "e0003.pt", "e0003_memory"]
    import json

    manifest = json.loads((folder / "e0003.json").read_text())
    assert manifest["world_size"] == 1 and manifest["epoch"] == 3
    assert set(manifest["files"]) == {"e0003.pt", "e0003_memory/memory_rank00000_of00001.pt"}
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_ino == (folder / "e0003.pt").stat().st_ino


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_complete_one_resumes(tmp_path, capsys):
    run3(tmp_path, "train.epochs=3")
    shard = tmp_path / "run" / "checkpoints" / "e0003_memory" / "memory_rank00000_of00001.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a crash mid-write on a file system without fsync
    capsys.readouterr()
    metrics = run3(tmp_path, "train.epochs=4")
    out = capsys.readouterr().out
    assert f"skipping a damaged checkpoint: checkpoint file {shard}: 100 bytes, expected" in out
    assert "resumed from epoch 2" in out and len(metrics["epochs"]) == 4
    from reid.checkpoint import verify

    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.json")) == ["e0003.json", "e0004.json"]
    assert all(verify(str(p)) for p in folder.glob("*.json"))  # the damaged one was rewritten, both complete


def test_pruning_keeps_the_checkpoint_just_written_and_drops_an_abandoned_newer_timeline(tmp_path):
    from reid.checkpoint import _prune

    for name in ("e0004", "e0005", "e0006", "e0005s000100"):  # e0006: damaged, the run resumed from e0005
        (tmp_path / f"{name}.json").write_text("{}")
        (tmp_path / f"{name}.pt").write_bytes(b"state")
        (tmp_path / f"{name}_memory").mkdir()
    _prune(str(tmp_path), "e0005s000100", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0005.json", "e0005.pt", "e0005_memory",
                                                          "e0005s000100.json", "e0005s000100.pt",
                                                          "e0005s000100_memory"]


def test_resume_false_sets_the_earlier_checkpoints_aside_instead_of_mixing_them(tmp_path, capsys):
    run3(tmp_path, "train.epochs=2")
    capsys.readouterr()
    run3(tmp_path, "train.epochs=1", "train.resume=false")
    assert "earlier checkpoints" in capsys.readouterr().out
    (aside,) = (tmp_path / "run").glob("checkpoints_set_aside_*")
    assert sorted(p.name for p in aside.glob("*.json")) == ["e0001.json", "e0002.json"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json")) == ["e0001.json"]


def test_only_the_files_a_manifest_names_are_read_and_a_checkpoint_without_manifest_does_not_exist(tmp_path,
                                                                                                     capsys):
    run3(tmp_path, "train.epochs=3")
    folder = tmp_path / "run" / "checkpoints"
    (folder / "e0003_memory" / "memory_rank00001_of00002.pt").write_bytes(b"stale rows of another world size")
    (folder / "e0003.json").unlink()  # a save interrupted before its manifest
    capsys.readouterr()
    run3(tmp_path, "train.epochs=3")
    assert "resumed from epoch 2" in capsys.readouterr().out
    (folder / "e0002.pt").write_bytes(b"garbage")
    (folder / "e0003.json").unlink()
    with pytest.raises(ReidError, match=r"checkpoints: no complete checkpoint"):
        run3(tmp_path, "train.epochs=4")


class Killed(Exception):
    """Stands for a SIGKILL of the process: nothing after it runs."""


def kill_after_call(monkeypatch, call: int):
    import reid.train

    real, calls = reid.train.sharded_ctacl_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(reid.train, "sharded_ctacl_loss", loss)


def test_a_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch,
                                                                                       capsys):
    every = ["train.epochs=3", "train.steps_per_epoch=5", "train.checkpoint_every_steps=2", "train.warmup_epochs=1",
             "memory.refresh_every=2"]
    whole = main(tiny_config(tmp_path / "whole", *every))
    kill_after_call(monkeypatch, 9)  # epoch 1, step 3: after the step-2 checkpoint of epoch 1
    with pytest.raises(Killed):
        main(tiny_config(tmp_path / "killed", *every))
    names = sorted(p.name for p in (tmp_path / "killed" / "run" / "checkpoints").glob("*.json"))
    assert names == ["e0001.json", "e0001s000002.json"]
    monkeypatch.undo()
    capsys.readouterr()
    resumed = main(tiny_config(tmp_path / "killed", *every))
    assert "resumed from epoch 1 step 2" in capsys.readouterr().out
    a = torch.load(tmp_path / "whole" / "run" / "final_model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "killed" / "run" / "final_model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == whole["final"]
    for mine, theirs in zip(whole["epochs"], resumed["epochs"], strict=True):
        assert {k: v for k, v in mine.items() if k != "images_per_s_per_rank"} == \
               {k: v for k, v in theirs.items() if k != "images_per_s_per_rank"}


@pytest.mark.parametrize("batchnorm", ["all_cameras", "per_rank"])
def test_two_ranks_resumed_from_a_mid_epoch_checkpoint_follow_the_uninterrupted_run(tmp_path, batchnorm):
    """2 gloo ranks: the run is cut right after its mid-epoch checkpoint (the newer checkpoints' manifests are
    removed, as if the job had been killed then) and resumed; float64 separates the implementation from rounding."""
    import shutil

    from tests.test_train import TINY, largest_difference, torchrun, trained_state

    every = TINY + [f"data.root={tmp_path / 'synth'}", "train.epochs=2", "train.warmup_epochs=1",
                    "train.steps_per_epoch=4", "train.checkpoint_every_steps=2", "train.keep_checkpoints=10",
                    "train.batch_size=12", "train.dtype=float64", f"model.batchnorm={batchnorm}"]
    torchrun(2, every + [f"output_dir={tmp_path / 'whole'}"])
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for name in ("e0002.json",):  # killed right after e0001s000002 (epoch 1 at step 2) was written
        (tmp_path / "cut" / "checkpoints" / name).unlink()
    for name in ("final_model.pt", "metrics.json"):
        (tmp_path / "cut" / name).unlink()
    result = torchrun(2, every + [f"output_dir={tmp_path / 'cut'}"])
    assert "resumed from epoch 1 step 2" in result.stdout
    difference, where = largest_difference(trained_state(tmp_path / "whole"), trained_state(tmp_path / "cut"))
    assert difference <= 1e-12, (difference, where)


def test_a_rank_killed_under_torchrun_restarts_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    """`torchrun --max-restarts=1`, one rank SIGKILLed after the first mid-epoch checkpoint: the group restarts,
    meets again (a fresh rendezvous per attempt) and resumes from the newest complete checkpoint."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_train import TINY, largest_difference, torchrun, trained_state

    every = TINY + [f"data.root={tmp_path / 'synth'}", "train.epochs=2", "train.warmup_epochs=1",
                    "train.steps_per_epoch=6", "train.checkpoint_every_steps=2", "train.batch_size=12",
                    "train.dtype=float64"]
    torchrun(2, every + [f"output_dir={tmp_path / 'whole'}"])
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "reid", "train", "--config", "configs/synthetic.yaml", *every, f"output_dir={tmp_path / 'killed'}"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first = tmp_path / "killed" / "checkpoints" / "e0000s000002.json"
    deadline = time.time() + 180
    while not first.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert first.exists() and len(workers) == 2, (workers, job.poll())
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out[-3000:]
    assert "resumed from epoch" in out
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert abs(whole["final"]["mAP"] - killed["final"]["mAP"]) <= 1e-9
    difference, where = largest_difference(trained_state(tmp_path / "whole"), trained_state(tmp_path / "killed"))
    assert difference <= 1e-9, (difference, where)


def test_a_failing_rank_ends_every_rank_with_its_error_printed_once(tmp_path):
    """A corrupt image on rank 1's cameras (data.skip_corrupt=false): rank 1 stops with the one-line error and the
    launcher ends rank 0 too, instead of leaving it in a collective until the 30-minute timeout."""
    import os
    import subprocess
    import sys

    import numpy as np

    from reid.config import load_config
    from reid.data.readers import load_dataset
    from reid.data.sampler import partition_cameras
    from reid.data.synthetic import ensure_synthetic
    from tests.test_train import TINY

    base = TINY + [f"data.root={tmp_path / 'synth'}", "train.epochs=1", "train.warmup_epochs=1"]
    cfg = load_config("configs/synthetic.yaml", base)
    ensure_synthetic(cfg.data.root, cfg.synth)
    train = load_dataset("veri776", cfg.data.root).train
    rank1 = partition_cameras(np.bincount(train.cams), 2)[1]
    victim = train.paths[int(np.flatnonzero(np.isin(train.cams, rank1))[0])]
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8\xff not a picture")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reid", "train",
           "--config", "configs/synthetic.yaml", *base, f"output_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)  # a hang would time out
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    original = [line for line in lines if "corrupt or unreadable image" in line]
    assert len(original) == 1 and victim in original[0], lines  # printed once, by the rank that met it
    worker_tracebacks = [line for line in (done.stdout + done.stderr).splitlines()
                         if line.startswith("[rank") and "Traceback" in line]
    assert not worker_tracebacks  # the other rank stops with one line too (torchrun's own report follows)
