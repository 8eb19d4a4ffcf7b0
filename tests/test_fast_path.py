"""The GPU fast path's switches keep training correct; each is exercised here on the CPU (float64 where the
comparison is exact up to rounding): channels_last, fused SGD, torch.compile, data.decode=gpu with persistent
workers."""

import json

import pytest
import torch

from reid.config import load_config
from reid.train import main
from tests.test_train import TINY

FLOAT64 = ["train.dtype=float64", "train.epochs=2", "train.warmup_epochs=1"]


def run(tmp_path, name, *extra):
    cfg = load_config("configs/synthetic.yaml", TINY + [f"data.root={tmp_path / 'synth'}",
                                                        f"output_dir={tmp_path / name}", *extra])
    metrics = main(cfg)
    state = torch.load(tmp_path / name / "final_model.pt", weights_only=False)
    return metrics, state["model"] if "model" in state else state


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_channels_last_and_fused_sgd_train_the_same_model(tmp_path):
    _, plain = run(tmp_path, "plain", *FLOAT64)
    _, fast = run(tmp_path, "fast", *FLOAT64, "train.channels_last=true", "train.fused_optimizer=true")
    assert max_difference(plain, fast) < 1e-9


def test_compiled_model_trains_the_same_model_and_saves_the_plain_one(tmp_path):
    pytest.importorskip("torch._dynamo")
    _, plain = run(tmp_path, "plain", *FLOAT64)
    _, compiled = run(tmp_path, "compiled", *FLOAT64, "train.compile=true", "train.compile_backend=aot_eager")
    assert not any("_orig_mod" in k for k in compiled)  # the checkpoint holds the plain model's names
    assert max_difference(plain, compiled) < 1e-9


def test_gpu_decoding_on_the_cpu_device_trains_with_persistent_workers(tmp_path):
    metrics, _ = run(tmp_path, "decode", "train.epochs=2", "train.warmup_epochs=1", "data.decode=gpu",
                     "data.workers=1")
    saved = json.loads((tmp_path / "decode" / "metrics.json").read_text())
    assert saved["final"] == metrics["final"] and 0.0 <= metrics["final"]["mAP"] <= 1.0
    assert all(e["loss"] == e["loss"] for e in saved["epochs"])  # finite losses in warm-up and full mode


def test_fast_path_switches_are_checked():
    from reid.errors import ReidError

    with pytest.raises(ReidError, match="train.channels_last"):
        load_config(None, ["train.channels_last=maybe"])
    assert load_config(None, ["train.fused_optimizer=true"]).train.fused_optimizer == "true"
