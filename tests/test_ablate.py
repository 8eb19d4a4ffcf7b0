import json

import pytest
import torch

from reid.ablate import ROWS, collect, format_ablation, main
from reid.errors import ReidError


def test_table_collects_every_finished_row(tmp_path):
    root = tmp_path / "ablation"
    for i, name in enumerate(["full", "no grey zone"]):
        row = root / name.replace(" ", "_")
        row.mkdir(parents=True)
        metrics = {"final": {"mAP": 0.1 * (i + 1), "rank1": 0.2, "rank5": 0.3},
                   "epochs": [{"epoch": 0}, {"epoch": 1, "hard_positive_precision": 0.25}]}
        (row / "metrics.json").write_text(json.dumps(metrics))
    results = collect(str(root), epochs=2)
    assert list(results) == ["full", "no grey zone"]
    assert results["no grey zone"]["overrides"] == ["loss.grey_zone=0"]
    assert results["full"]["hard_positive_precision"] == 0.25
    table = format_ablation(results, 2)
    assert "| full | 10.0 | 20.0 | 30.0 | 25.0 | – |" in table


def test_every_row_switches_off_one_component():
    assert ROWS["full"] == [] and ROWS["intra-only"] == ["train.warmup_epochs={epochs}"]
    assert len({tuple(v) for v in ROWS.values()}) == len(ROWS)


def test_unknown_row_is_an_error():
    with pytest.raises(ReidError, match="no such row"):
        main(["--rows", "no such row"])


def test_init_from_continues_a_finished_warmup_as_the_uninterrupted_run_would(tmp_path):
    from reid.config import load_config
    from reid.train import main as train
    from tests.test_train import TINY

    def cfg(name, *extra):
        return load_config("configs/synthetic.yaml", TINY + [f"data.root={tmp_path / 'synth'}",
                                                             f"output_dir={tmp_path / name}", *extra])

    train(cfg("warmup", "train.epochs=1", "train.warmup_epochs=1"))
    before = sorted(p.name for p in (tmp_path / "warmup" / "checkpoints").iterdir())
    started = train(cfg("row", "train.epochs=2", "train.warmup_epochs=1", f"train.init_from={tmp_path / 'warmup'}"))
    whole = train(cfg("whole", "train.epochs=2", "train.warmup_epochs=1"))
    assert sorted(p.name for p in (tmp_path / "warmup" / "checkpoints").iterdir()) == before  # only read
    row, ref = (torch.load(tmp_path / n / "final_model.pt", weights_only=False) for n in ("row", "whole"))
    row, ref = (m.get("model", m) for m in (row, ref))
    assert all(torch.equal(row[k], ref[k]) for k in ref)
    assert started["final"] == whole["final"]
    saved = json.loads((tmp_path / "row" / "metrics.json").read_text())
    warmup = json.loads((tmp_path / "warmup" / "metrics.json").read_text())
    assert saved["warmup"] == warmup["final"] and len(saved["epochs"]) == 2  # the warm-up run's end is the warm-up


def test_init_from_without_checkpoints_is_a_one_line_error(tmp_path):
    from reid.config import load_config
    from reid.train import main as train

    (tmp_path / "empty").mkdir()
    with pytest.raises(ReidError, match="train.init_from.*no complete checkpoint"):
        train(load_config("configs/synthetic.yaml", [f"train.init_from={tmp_path / 'empty'}", "device=cpu",
                                                      f"output_dir={tmp_path / 'run'}", "model.arch=resnet18",
                                                      f"data.root={tmp_path / 'synth'}", "synth.identities=16",
                                                      "synth.test_identities=8", "synth.cameras=4",
                                                      "synth.height=32", "synth.width=32"]))


def test_a_loss_variant_reaches_the_training_loss(tmp_path, monkeypatch):
    import reid.train
    from reid.config import load_config
    from tests.test_train import TINY

    seen = []
    real = reid.train.sharded_ctacl_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["variant"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reid.train, "sharded_ctacl_loss", spy)
    metrics = reid.train.main(load_config("configs/synthetic.yaml", TINY + [
        f"data.root={tmp_path / 'synth'}", f"output_dir={tmp_path / 'run'}", "train.epochs=2", "train.warmup_epochs=1",
        "loss.variant=center+camera_softmax"]))
    assert set(seen) == {"center+camera_softmax"} and 0.0 <= metrics["final"]["mAP"] <= 1.0
    assert all(e["loss"] == e["loss"] for e in metrics["epochs"])  # finite
