"""`reid bench`: one command runs every throughput benchmark and reports it as tables and JSON.

The quick run (tiny sizes, about a minute on 2 CPU cores) is made once for the module; the tests read its JSON.
Values are checked for sense (rates positive, a step costs at least about its floor, collectives counted across
ranks, the naive loss equal to the vectorised one), never for speed.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args, timeout=300):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "reid", "bench", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = _bench("--quick", "--json", str(folder / "bench.json"), "--png", str(folder / "scaling.png"))
    assert out.returncode == 0, out.stderr
    with open(folder / "bench.json") as fh:
        return json.load(fh), out.stdout, folder


def test_quick_run_reports_machine_versions_settings_and_every_section(quick):
    report, stdout, _ = quick
    machine = report["machine"]
    assert machine["hostname"] and machine["cpu_model"] and machine["cores"] >= 1
    assert machine["torch"] == torch.__version__ and machine["torchvision"] and machine["python"]
    assert machine["device"] == "cpu" or machine["device"].startswith("cuda")
    assert report["quick"] is True
    assert report["sections_run"] == ["step", "loss", "input", "scaling", "eval"]
    assert set(report["results"]) == set(report["settings"]) == set(report["sections_run"])
    assert report["settings"]["loss"]["batch"] == 64  # the quick sizes were used
    for name in report["sections_run"]:
        assert f"== {name} ==" in stdout
        assert report["wall_s"][name] > 0


def test_full_step_is_timed_against_the_backbone_on_both_memory_sizes(quick):
    step = quick[0]["results"]["step"]
    assert [r["name"] for r in step["sizes"]] == ["veri776", "veriwild"]
    assert [r["cameras"] for r in step["sizes"]] == [20, 174]
    for r in step["sizes"]:
        assert r["backbone_images_per_s"] > 0 and r["full_images_per_s"] > 0
        assert r["full_over_backbone"] >= 0.5  # the full step does the backbone's work and more
        assert r["collectives_per_step"] == 0  # one process: every reid.dist operation is the identity
        assert r["D"] == 512  # the quick model: resnet18


def test_loss_step_is_timed_against_its_floor_and_the_naive_loop_agrees(quick):
    loss = quick[0]["results"]["loss"]
    assert [r["N"] for r in loss["sizes"]] == [37_778 // 8, 277_797 // 8]
    for r in loss["sizes"]:
        assert r["floor_s"] > 0 and r["loss_step_s"] > 0 and r["naive_s"] > 0
        assert r["ratio_to_floor"] >= 0.5
        assert len(r["floors_s"]) == len(r["steps_s"]) == 3
        assert r["naive_vs_vectorised_loss_rel_diff"] < 1e-4
        assert r["naive_vs_vectorised_grad_rel_diff"] < 1e-3


def test_input_rates_per_worker_and_against_the_step(quick):
    report = quick[0]
    r = report["results"]["input"]
    assert r["images"] == 48 and r["decode_images_per_s"] > 0 and r["worker_images_per_s"] > 0
    assert r["batched_device"] == report["machine"]["device"]  # data.decode=gpu runs on whatever the device is
    assert r["read_bytes_images_per_s"] > 0 and r["batched_decode_images_per_s"] > 0
    assert r["batched_decode_augment_images_per_s"] > 0
    consumed = max(s["full_images_per_s"] for s in report["results"]["step"]["sizes"])
    assert r["step_consumes_images_per_s"] == pytest.approx(consumed)
    assert r["workers_to_feed_step"] == pytest.approx(consumed / r["worker_images_per_s"])
    assert r["batched_over_step"] == pytest.approx(r["batched_decode_augment_images_per_s"] / consumed)


def test_scaling_counts_collectives_and_bytes_only_with_several_ranks(quick):
    report, _, folder = quick
    worlds = report["results"]["scaling"]["worlds"]
    assert [w["ranks"] for w in worlds] == [1, 2, 4]
    one, *several = worlds
    assert one["loss_collectives_per_step"] == one["loss_comm_bytes_per_rank"] == 0
    assert one["loss_efficiency"] == one["full_efficiency"] == 1.0
    for w in several:
        assert w["loss_collectives_per_step"] > 0 and w["loss_comm_bytes_per_rank"] > 0
        assert w["full_collectives_per_step"] > w["loss_collectives_per_step"]  # + BatchNorm over all cameras
        assert w["ddp_gradient_bytes_per_rank"] > 0
    for w in worlds:
        assert w["loss_step_s"] > 0 and w["full_images_per_s"] > 0 and w["full_efficiency"] > 0
        assert len(w["rows_per_rank"]) == w["ranks"]
        assert min(w["rows_per_rank"]) > 0.5 * 2_000  # weak scaling: about the same rows on every rank
    png = report["png"]
    if png["skipped"] is None:
        assert os.path.getsize(folder / "scaling.png") > 0
    else:
        assert png["skipped"] == "matplotlib is not installed"


def test_evaluation_is_timed_against_the_matmul_and_checked_against_a_full_sort(quick):
    r = quick[0]["results"]["eval"]
    assert r["gallery"] == 20_000 and r["queries_timed"] == 256
    assert r["evaluate_ms_per_query"] > 0 and r["matmul_ms_per_query"] > 0 and r["ratio"] >= 0.5
    assert r["check_max_abs_difference"] < 1e-6


def test_unknown_section_is_a_one_line_error():
    out = _bench("step", "warp", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: reid bench: unknown section 'warp', expected some of step, loss, input, scaling, eval"]


def test_unknown_setting_is_a_one_line_error_naming_the_known_ones():
    out = _bench("loss", "loss.batchsize=3", timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown setting 'loss.batchsize'" in lines[0] and "loss.batch," in lines[0]
