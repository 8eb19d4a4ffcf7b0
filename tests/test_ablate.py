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


def test_a_row_started_from_the_shared_warmup_resumes_with_its_metrics_renamed(tmp_path):
    from reid.ablate import start_from_warmup

    warmup = tmp_path / "_warmup"
    (warmup / "memory_e0003").mkdir(parents=True)
    (warmup / "memory_e0003" / "memory_rank00000_of00001.pt").write_bytes(b"rows")
    torch.save({"epoch": 3, "memory_dir": "memory_e0003", "metrics": {"untrained": {"mAP": 0.02}}},
               warmup / "checkpoint.pt")
    (warmup / "metrics.json").write_text(json.dumps({"untrained": {"mAP": 0.02}, "final": {"mAP": 0.12}}))
    row = tmp_path / "full"
    start_from_warmup(str(warmup), str(row))
    ckpt = torch.load(row / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 3 and (row / "memory_e0003" / "memory_rank00000_of00001.pt").read_bytes() == b"rows"
    assert ckpt["metrics"] == {"untrained": {"mAP": 0.02}, "warmup": {"mAP": 0.12}}
    ckpt["epoch"] = 5  # a row that already has its own checkpoint is left alone
    torch.save(ckpt, row / "checkpoint.pt")
    start_from_warmup(str(warmup), str(row))
    assert torch.load(row / "checkpoint.pt", weights_only=False)["epoch"] == 5
