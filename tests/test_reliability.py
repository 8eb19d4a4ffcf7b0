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
    with pytest.raises(ReidError, match=r"checkpoint.pt: the checkpoint was trained with other data or another "
                                        r"model \(model.last_stride: 2 → 1\)"):
        main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1", "model.last_stride=1"))
    capsys.readouterr()
    main(tiny_config(tmp_path, "train.epochs=2", "train.warmup_epochs=1", "eval.picture_queries=2"))
    out = capsys.readouterr().out
    assert "resuming with a changed config: eval.picture_queries: 3 → 2; train.epochs: 1 → 2" in out
    assert "resumed from epoch 1" in out
