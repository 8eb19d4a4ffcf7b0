"""Camera-sharded training equals one process (DESIGN §4, issue 5): gloo ranks on CPU, float64.

The worlds are started once per module (R = 2 first, it saves the memory; then 1 and 4, which load it)
and every test reads what the ranks wrote; see tests/dist_workers.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid.dist import ONE_PROCESS
from reid.loss_terms import camera_centroids, radix_select
from reid.losses import ctacl_loss, ctacl_loss_parts
from tests.dist_workers import LOSS_ARGS, MODES, problem, run_world

WORLDS = (1, 2, 4)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    saved = str(root / "memory_saved_by_2")
    out = {2: run_world(2, str(root / "r2"), save_to=saved)}
    for world in (1, 4):
        out[world] = run_world(world, str(root / f"r{world}"), load_from=saved)
    return out


def union(ranks, key):
    return torch.cat([r[key] for r in ranks])


def close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max()) <= rel * max(1e-12, float(b.abs().max()))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_loss_and_every_anchor_gradient_equal_the_single_process_loss(worlds, world, mode):
    ranks = worlds[world]
    memory, cams, tracklets, features = problem()
    rows = union(ranks, "rows")
    f = features[rows].clone().requires_grad_()
    ref = ctacl_loss(f, cams[rows], tracklets[rows], memory, cams, tracklets, **{**LOSS_ARGS, **MODES[mode]})
    ref.backward()
    loss = sum(r[mode]["loss"] for r in ranks)
    grad = torch.cat([r[mode]["grad"] for r in ranks])
    assert close(loss, ref.detach()), (loss, float(ref))
    assert close(grad, f.grad)


@pytest.mark.parametrize("world", WORLDS)
def test_mined_positives_and_logged_parts_are_those_of_the_union_batch(worlds, world):
    ranks = worlds[world]
    memory, cams, tracklets, features = problem()
    rows = union(ranks, "rows")
    ref = ctacl_loss_parts(features[rows], cams[rows], tracklets[rows], memory, cams, tracklets, **LOSS_ARGS)
    got = {k: torch.cat([r["full"][k] for r in ranks]) for k in ("hard_ids", "easy_ids")}
    assert torch.equal(got["hard_ids"], ref["hard_ids"])
    assert torch.equal(got["easy_ids"], ref["easy_ids"])
    for key in ("intra", "inter", "cam"):
        assert all(abs(r["full"][key] - float(ref[key])) <= 1e-9 * abs(float(ref[key])) for r in ranks), key


@pytest.mark.parametrize("world", WORLDS)
def test_one_ddp_sgd_step_gives_the_single_process_parameters(worlds, world):
    memory, cams, tracklets, features = problem()
    rows = union(worlds[world], "rows")
    torch.manual_seed(0)
    model = torch.nn.Linear(features.shape[1], features.shape[1], bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    emb = F.normalize(model(features[rows]), dim=1)
    ctacl_loss(emb, cams[rows], tracklets[rows], memory, cams, tracklets, **LOSS_ARGS).backward()
    opt.step()
    for r in worlds[world]:
        assert close(r["ddp_weight"], model.weight.detach())


def updated_memory(ranks):
    """The single-process memory after ``m ← normalize(½m + ½f)`` with the union batch's embeddings."""
    memory, cams, tracklets, features = problem()
    rows = union(ranks, "rows")
    torch.manual_seed(0)
    model = torch.nn.Linear(features.shape[1], features.shape[1], bias=False).double()
    emb = F.normalize(model(features[rows]), dim=1).detach()
    memory = memory.clone()
    memory[rows] = F.normalize(0.5 * memory[rows] + 0.5 * emb, dim=1)
    return memory, cams


@pytest.mark.parametrize("world", WORLDS)
def test_memory_update_and_camera_centroids_equal_the_single_process_ones(worlds, world):
    ranks = worlds[world]
    memory, cams = updated_memory(ranks)
    for r in ranks:
        assert close(r["bank_rows"], memory[r["bank_ids"]], rel=1e-12)
    ref, present = camera_centroids(memory, cams, len(ranks[0]["present"]))
    for r in ranks:
        assert torch.equal(r["present"], present) and not present[6]  # camera 6 has no rows: absent
        assert close(r["centroids"][present], ref[present], rel=1e-12)


def test_each_rank_holds_only_its_cameras_rows(worlds):
    memory, cams, _, _ = problem()
    for world in WORLDS:
        held = [set(r["bank_ids"].tolist()) for r in worlds[world]]
        assert sum(len(h) for h in held) == memory.shape[0] and len(set().union(*held)) == memory.shape[0]
        for h in held:
            rank_cams = set(cams[list(h)].tolist())
            others = set().union(*(set(cams[list(o)].tolist()) for o in held if o is not h))
            assert not rank_cams & others


@pytest.mark.parametrize("world", (1, 4))
def test_memory_saved_with_2_ranks_loads_identically_with_another_world_size(worlds, world):
    saved = torch.zeros(problem()[0].shape, dtype=torch.float64)
    for r in worlds[2]:  # exactly what the 2 ranks held when they saved
        saved[r["bank_ids"]] = r["bank_rows"]
    for r in worlds[world]:
        assert torch.equal(r["loaded_rows"], saved[r["loaded_ids"]])


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_communicated_per_step_do_not_grow_with_the_memory(worlds, world):
    for r in worlds[world]:
        small, large = sorted(r["comm_bytes"])
        assert r["comm_bytes"][small] == r["comm_bytes"][large]
        if world == 1:
            assert r["comm_bytes"][small] == 0  # one process: no collectives at all


@pytest.mark.parametrize("world", (2, 4))
def test_collectives_and_host_syncs_per_step_do_not_grow_with_the_memory(worlds, world):
    for r in worlds[world]:
        small, large = sorted(r["collectives"])
        # 2 gathers (anchors + their sizes) and 1 of the packed hard rows, 8 radix rounds (float64 here; 4 in
        # float32), 1 candidate gather, 1 log-sum-exp gather, 1 centroid sum, 1 reduce-scatter in backward
        assert r["collectives"][small] == r["collectives"][large] == 15
        for n in (small, large):  # only the union's sizes reach the host
            calls = r["host_syncs"][n]
            assert sum(calls.values()) == 1 and all(k.startswith("tolist at reid/dist.py") for k in calls), calls


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_radix_selection_finds_the_exact_kth_largest_value(dtype):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(5, 300, generator=g, dtype=dtype) * torch.tensor([1e-3, 1, 1e3, 1, 1], dtype=dtype)[:, None]
    values[3] = values[3].abs().neg()  # all negative
    valid = torch.rand(5, 300, generator=g) < 0.7
    k = torch.tensor([1, 7, 30, 50, int(valid[4].sum())])
    candidates = values.masked_fill(~valid, -float("inf"))  # what the loss passes: -inf where not in O_i
    cut = radix_select(candidates, k, ONE_PROCESS)
    for i in range(5):
        expected = values[i][valid[i]].sort(descending=True).values[k[i] - 1]
        assert torch.equal(cut[i], expected)
        assert int((candidates[i] >= cut[i]).sum()) == int(k[i])


def test_rows_of_another_rank_are_a_clear_error():
    from reid.errors import ReidError
    from reid.memory import MemoryBank

    bank = MemoryBank(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4), 3, 2)
    with pytest.raises(ReidError, match="not held by rank"):
        bank.update(torch.tensor([9]), torch.ones(1, 3))
    with pytest.raises(ReidError, match="expected 0..1"):
        MemoryBank(torch.arange(2), torch.tensor([0, 5]), torch.arange(2), 3, 2)
    assert np.isclose(bank.nbytes(), 4 * 3 * 4 + 3 * 4 * 8)


def test_torchrun_selftest_with_2_ranks_passes():
    import os
    import subprocess
    import sys

    from tests.dist_workers import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "reid", "selftest", "--rows", "600", "--dim", "16", "--batch", "6", "--cameras", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "selftest passed" in done.stdout and "2 rank(s), backend gloo" in done.stdout


SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
              "SLURM_JOB_NODELIST": "gpu-a[01-02]"}


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake `scontrol` that expands gpu-a[01-02] and fails for anything else."""
    script = tmp_path / "scontrol"
    script.write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu-a[01-02]" ] || exit 1\nprintf "gpu-a01\\ngpu-a02\\n"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_torchrun_environment_gives_rank_world_and_master_even_inside_a_slurm_task():
    from reid.launcher import LauncherEnv, launcher_env

    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
    assert launcher_env({**SLURM_TASK, **torchrun}) == LauncherEnv("torchrun", 3, 1, 4, "node-a", 29500)


def test_slurm_environment_gives_rank_world_first_node_and_a_port_per_job_and_requeue(scontrol):
    from reid.launcher import LauncherEnv, launcher_env

    first = launcher_env(SLURM_TASK)
    assert first == LauncherEnv("slurm", 5, 1, 8, "gpu-a01", 15000 + (1234 * 16) % 20000)
    requeued = launcher_env({**SLURM_TASK, "SLURM_RESTART_COUNT": "1"})
    assert requeued.master_port == first.master_port + 1 == 34745
    assert launcher_env({**SLURM_TASK, "SLURM_JOB_ID": "1235"}).master_port == 15000 + (1235 * 16) % 20000


def test_rendezvous_set_by_hand_wins_over_slurm_nodelist_and_port():
    from reid.launcher import launcher_env

    found = launcher_env({**SLURM_TASK, "SLURM_JOB_NODELIST": "", "MASTER_ADDR": "node-ib0", "MASTER_PORT": "23456"})
    assert (found.master_addr, found.master_port) == ("node-ib0", 23456)


def test_one_slurm_task_needs_no_rendezvous_and_no_environment_means_none():
    from reid.launcher import LauncherEnv, launcher_env

    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == LauncherEnv("slurm", 0, 0, 1, None, None)
    assert launcher_env({"SLURM_JOB_ID": "7"}) is None


@pytest.mark.parametrize("environ, message", [
    ({**SLURM_TASK, "SLURM_JOB_NODELIST": ""}, "neither MASTER_ADDR nor SLURM_JOB_NODELIST is set"),
    ({**SLURM_TASK, "SLURM_JOB_NODELIST": "cpu[1-2]"}, r"`scontrol show hostnames cpu\[1-2\]` failed"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "RANK and WORLD_SIZE are set but MASTER_ADDR is not"),
    ({**SLURM_TASK, "SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight', expected an integer"),
])
def test_missing_or_malformed_launcher_variable_is_one_line_error(scontrol, environ, message):
    from reid.launcher import launcher_env
    from reid.errors import ReidError

    with pytest.raises(ReidError, match=message) as caught:
        launcher_env(environ)
    assert "\n" not in str(caught.value)


def test_no_launcher_environment_means_one_process_and_identity_collectives(monkeypatch):
    from reid import dist

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    env = dist.init_distributed("cpu")
    assert (env.rank, env.world_size, env.backend, env.device.type) == (0, 1, None, "cpu")
    t = torch.arange(3.0, requires_grad=True)
    union, sizes = dist.gather_anchors(t)
    assert union is t and sizes == [3] and dist.gather_objects("x") == ["x"] and dist.is_main()
    assert torch.equal(dist.sum_across_ranks(t), t.detach())
