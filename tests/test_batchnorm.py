"""BatchNorm over all cameras (DESIGN §4): AllReduceBatchNorm on R gloo ranks equals plain BatchNorm on the union batch.

Each world (R = 2 and 4, uneven local batches, an empty one in every 4-rank step) is started once per module; its
ranks write ``rank{r}.pt`` and the tests compare them with torch's BatchNorm on the concatenated batch, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from reid.batchnorm import AllReduceBatchNorm, convert_batchnorm, merge_running_stats
from reid.errors import ReidError
from tests.dist_workers import free_port

pytestmark = pytest.mark.timeout(300)

TOL = 1e-10
STEPS = 3
SIZES = {2: [3, 5], 4: [3, 0, 4, 2]}  # local batch sizes at step 0; step s rolls them by s
CASES = {  # name: (dims, channels, momentum, affine, frozen bias)
    "bn2d": (2, 3, 0.1, True, False),
    "bn2d_cumulative": (2, 3, None, True, False),
    "bn1d_neck": (1, 6, 0.1, True, True),
    "bn1d_no_affine": (1, 6, None, False, False),
}
MERGE_WEIGHTS = [10.0, 30.0, 5.0, 20.0]


# ----------------------------------------------------------------------------------------- the shared problem


def sizes_at(world: int, step: int) -> list[int]:
    s = SIZES[world]
    return s[-(step % world):] + s[:-(step % world)] if step % world else list(s)


def union_batch(name: str, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union input x (Σn_r, C, *) and the fixed upstream gradient G of the loss Σ out·G."""
    dims, c = CASES[name][:2]
    g = torch.Generator().manual_seed(1000 * world + 10 * step + list(CASES).index(name))
    shape = (sum(sizes_at(world, step)), c) + ((4, 5) if dims == 2 else ())
    offset = torch.randn(c, generator=g, dtype=torch.float64).view((1, c) + (1,) * (len(shape) - 2))
    x = 3 * torch.randn(shape, generator=g, dtype=torch.float64) + 5 * offset  # far from 0: stats must not cancel
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


def make_layer(name: str, cls=None) -> torch.nn.Module:
    dims, c, momentum, affine, frozen_bias = CASES[name]
    cls = cls or (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm1d)
    bn = cls(c, momentum=momentum, affine=affine).double()
    if affine:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
            bn.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
        bn.bias.requires_grad_(not frozen_bias)  # the model's BNNeck
    return bn


def train_steps(bn: torch.nn.Module, name: str, world: int, rank: int | None) -> dict:
    """STEPS training steps of loss Σ out·G (rank: only this rank's slice; None: the whole union), then eval."""
    steps = []
    for step in range(STEPS):
        x, g = union_batch(name, world, step)
        if rank is not None:
            sizes = sizes_at(world, step)
            lo = sum(sizes[:rank])
            x, g = x[lo:lo + sizes[rank]], g[lo:lo + sizes[rank]]
        x = x.clone().requires_grad_()
        bn.zero_grad(set_to_none=True)
        out = bn(x)
        (out * g).sum().backward()
        grads = {k: None if p is None or p.grad is None else p.grad.clone() for k, p in (("weight", bn.weight),
                                                                                        ("bias", bn.bias))}
        steps.append({"out": out.detach(), "grad": x.grad, **grads})
        if step == 0:
            first = x.detach()
    bn.eval()
    with torch.no_grad():
        evaluated = bn(first)  # eval: the running statistics, no collective
    bn.train()
    return {"steps": steps, "eval": evaluated, "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(), "num_batches_tracked": int(bn.num_batches_tracked)}


def rank_stats(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's (running_mean, running_var, num_batches_tracked) of the two layers of merge_model()."""
    g = torch.Generator().manual_seed(50 + rank)
    return [(torch.randn(c, generator=g, dtype=torch.float64) + rank,
             torch.rand(c, generator=g, dtype=torch.float64) + 0.5, 3 + 2 * rank + i) for i, c in enumerate((3, 2))]


def merge_model(rank: int) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Sequential(torch.nn.BatchNorm2d(2))).double()
    for bn, (mean, var, tracked) in zip((model[0], model[1][0]), rank_stats(rank)):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.fill_(tracked)
    return model


# ----------------------------------------------------------------------------------------- the worlds


def _worker(rank: int, world: int, port: int, outdir: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from reid import dist

    dist.init_distributed("cpu")
    out = {name: train_steps(make_layer(name, AllReduceBatchNorm), name, world, rank) for name in CASES}

    bn = make_layer("bn2d", AllReduceBatchNorm)
    x = union_batch("bn2d", world, 0)[0][: SIZES[world][rank]].clone().requires_grad_()
    dist.reset_comm_bytes()
    y = bn(x)
    calls = {"forward": dist.COMM_BYTES["calls"]}
    y.sum().backward()
    calls["backward"] = dist.COMM_BYTES["calls"] - calls["forward"]
    bn.eval()
    bn(x)
    calls["eval"] = dist.COMM_BYTES["calls"] - calls["forward"] - calls["backward"]
    out["calls"] = calls

    try:  # one value per channel over all ranks: rank 0 holds it, the others are empty
        make_layer("bn1d_neck", AllReduceBatchNorm)(torch.ones(1 if rank == 0 else 0, 6, dtype=torch.float64))
        out["error"] = None
    except ReidError as e:
        out["error"] = str(e)
    out["after_error"] = float(dist.sum_across_ranks(torch.ones(1)))  # the ranks are still in step

    model = merge_model(rank)
    merge_running_stats(model, MERGE_WEIGHTS[rank])
    out["merged"] = [(bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
                     for bn in (model[0], model[1][0])]
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = {}
    for world in SIZES:
        outdir = str(tmp_path_factory.mktemp(f"bn_world{world}"))
        mp.spawn(_worker, args=(world, free_port(), outdir), nprocs=world, join=True)
        out[world] = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return out


_REFERENCES = {}


def reference(name: str, world: int) -> dict:
    if (name, world) not in _REFERENCES:
        _REFERENCES[name, world] = train_steps(make_layer(name), name, world, None)
    return _REFERENCES[name, world]


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1.0, float(b.abs().max()) if b.numel() else 0.0), err


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", list(SIZES))
def test_all_reduce_batchnorm_on_r_ranks_equals_plain_batchnorm_on_the_union_batch(worlds, world, name):
    ranks, ref = worlds[world], reference(name, world)
    for step in range(STEPS):
        assert [len(r[name]["steps"][step]["out"]) for r in ranks] == sizes_at(world, step)
        assert_close(torch.cat([r[name]["steps"][step]["out"] for r in ranks]), ref["steps"][step]["out"])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", list(SIZES))
def test_each_ranks_input_gradient_is_its_slice_of_the_union_gradient(worlds, world, name):
    ranks, ref = worlds[world], reference(name, world)
    for step in range(STEPS):
        assert_close(torch.cat([r[name]["steps"][step]["grad"] for r in ranks]), ref["steps"][step]["grad"])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", list(SIZES))
def test_weight_and_bias_gradients_summed_over_ranks_equal_the_union_gradients(worlds, world, name):
    ranks, ref = worlds[world], reference(name, world)
    for step in range(STEPS):
        for key in ("weight", "bias"):
            if ref["steps"][step][key] is None:  # affine=False, or the BNNeck's frozen bias
                assert all(r[name]["steps"][step][key] is None for r in ranks)
            else:
                assert_close(sum(r[name]["steps"][step][key] for r in ranks), ref["steps"][step][key])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", list(SIZES))
def test_running_statistics_are_identical_on_every_rank_and_equal_those_of_the_union_batchnorm(worlds, world, name):
    ranks, ref = worlds[world], reference(name, world)
    for r in ranks:
        assert torch.equal(r[name]["running_mean"], ranks[0][name]["running_mean"])
        assert torch.equal(r[name]["running_var"], ranks[0][name]["running_var"])
        assert r[name]["num_batches_tracked"] == ref["num_batches_tracked"] == STEPS
        assert_close(r[name]["running_mean"], ref["running_mean"])
        assert_close(r[name]["running_var"], ref["running_var"])
    assert_close(torch.cat([r[name]["eval"] for r in ranks]), ref["eval"])


@pytest.mark.parametrize("world", list(SIZES))
def test_training_uses_one_collective_in_forward_one_in_backward_and_none_in_eval(worlds, world):
    for r in worlds[world]:
        assert r["calls"] == {"forward": 1, "backward": 1, "eval": 0}


@pytest.mark.parametrize("world", list(SIZES))
def test_union_count_of_one_raises_on_every_rank_and_no_rank_is_left_waiting(worlds, world):
    for r in worlds[world]:
        assert "expected more than 1 value per channel when training, got 1" in r["error"]
        assert r["after_error"] == world


@pytest.mark.parametrize("world", list(SIZES))
def test_merge_running_stats_gives_the_weighted_mixture_on_every_rank(worlds, world):
    w = torch.tensor(MERGE_WEIGHTS[:world], dtype=torch.float64)
    for layer in range(2):
        means = torch.stack([rank_stats(r)[layer][0] for r in range(world)])
        vars_ = torch.stack([rank_stats(r)[layer][1] for r in range(world)])
        mean = (w[:, None] * means).sum(0) / w.sum()
        var = (w[:, None] * (vars_ + (means - mean) ** 2)).sum(0) / w.sum()
        for r in worlds[world]:
            got_mean, got_var, tracked = r["merged"][layer]
            assert_close(got_mean, mean)
            assert_close(got_var, var)
            assert tracked == max(rank_stats(q)[layer][2] for q in range(world))


def test_merge_running_stats_with_one_process_is_the_identity():
    model = merge_model(3)
    merge_running_stats(model, 4.0)
    for bn, (mean, var, tracked) in zip((model[0], model[1][0]), rank_stats(3)):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert int(bn.num_batches_tracked) == tracked


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_process_all_reduce_batchnorm_equals_batchnorm2d_in_values_gradients_and_running_stats(
        dtype, tol, momentum):
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).to(dtype)
    ours = AllReduceBatchNorm(3, momentum=momentum).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
        ours.weight.copy_(ref.weight), ours.bias.copy_(ref.bias)
    for _ in range(3):
        x, g = 3 * torch.randn(4, 3, 4, 5, dtype=dtype) + 2, torch.randn(4, 3, 4, 5, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.zero_grad(), ours.zero_grad()
        ya, yb = ref(xa), ours(xb)
        (ya * g).sum().backward(), (yb * g).sum().backward()
        for a, b in ((yb, ya), (xb.grad, xa.grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad),
                     (ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)):
            assert_close(a.detach(), b.detach(), tol)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ref.eval(), ours.eval()
    assert_close(ours(x).detach(), ref(x).detach(), tol)


def test_one_process_union_count_of_one_raises_more_than_1_value_per_channel():
    with pytest.raises(ReidError, match="more than 1 value per channel"):
        AllReduceBatchNorm(4)(torch.randn(1, 4))
    assert AllReduceBatchNorm(4).eval()(torch.randn(1, 4)).shape == (1, 4)  # eval uses running stats: allowed


def tiny_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 5), torch.nn.BatchNorm1d(5))
    model[5].bias.requires_grad_(False)
    model(torch.randn(6, 3, 4, 4))  # non-default running statistics
    model[5].eval()
    return model


def test_convert_batchnorm_gives_all_reduce_batchnorm_with_the_same_parameters_buffers_and_keys():
    model = tiny_model()
    params = dict(model.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_out = model.eval()(torch.ones(2, 3, 4, 4))
    model.train()[5].eval()
    converted = convert_batchnorm(model)
    assert [type(m) for m in converted] == [torch.nn.Conv2d, AllReduceBatchNorm, torch.nn.ReLU, torch.nn.Flatten,
                                            torch.nn.Linear, AllReduceBatchNorm]
    assert list(dict(converted.named_parameters())) == list(params) and len(params) == 8
    assert all(p is params[k] for k, p in converted.named_parameters())
    assert {k: p.requires_grad for k, p in converted.named_parameters()} == flags
    assert list(converted.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())
    assert converted[1].training and not converted[5].training
    torch.nn.Sequential(*tiny_model()).load_state_dict(converted.state_dict())  # checkpoints load into plain models
    assert_close(converted.eval()(torch.ones(2, 3, 4, 4)).detach(), plain_out.detach())


def test_convert_batchnorm_also_replaces_sync_batchnorm_keeping_its_parameters():
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model())
    weight = model[1].weight
    converted = convert_batchnorm(model)
    assert type(converted[1]) is type(converted[5]) is AllReduceBatchNorm
    assert converted[1].weight is weight and not converted[5].bias.requires_grad


def test_half_precision_input_is_normalised_in_float32_like_autocast_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    plain, ours = torch.nn.BatchNorm2d(3), AllReduceBatchNorm(3)
    out = ours(x.bfloat16())
    assert out.dtype == torch.float32
    assert_close(out.detach(), plain(x.bfloat16().float()).detach(), tol=1e-5)
    assert torch.allclose(ours.running_mean, plain.running_mean) and torch.allclose(ours.running_var, plain.running_var)

