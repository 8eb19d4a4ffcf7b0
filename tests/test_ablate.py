import json

import pytest

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
