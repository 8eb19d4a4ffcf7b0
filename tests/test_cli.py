import json
import subprocess
import sys

from reid.cli import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "reid", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_synth_then_data_summary_json(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["synth", "--out", str(root), "--seed", "3", "identities=8", "test_identities=4", "cameras=4",
                 "height=32", "width=32"]) == 0
    capsys.readouterr()
    assert main(["data", "summary", "--format", "veri776", "--root", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"train", "query", "gallery"}
    assert summary["train"]["identities"] == 8 and summary["train"]["cameras"] == 4
    assert summary["query"]["identities"] == 4
    for row in summary.values():
        assert set(row) == {"images", "cameras", "tracklets", "identities"}


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["data", "summary", "--format", "veri776", "--root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err
    assert main(["train", "--config", "configs/synthetic.yaml", "train.epochs=zero"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and err.count("\n") == 1
