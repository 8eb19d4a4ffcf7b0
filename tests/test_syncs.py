"""Host synchronisations: the counter sees what would make a GPU wait, and the training step makes one."""

from types import SimpleNamespace

import torch

from reid.config import load_config
from reid.memory import MemoryBank
from reid.meters import TrainMeter
from reid.model import build_model
from reid.syncs import count_host_syncs
from reid.train import train_one_epoch


def test_counter_sees_python_values_data_dependent_shapes_and_mask_indexing():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        bool(x[0] > 0)
        float(x.sum())
        x[x > 2]  # a boolean mask: the result's size depends on the data
        torch.unique(x)
        x.nonzero()
        x.new_tensor([1.0])  # Python data copied to x's device
        torch.tensor([1, 2], device=x.device)
        y = x * 2 + 1  # none of these wait
        x.new_full((2,), 3.0)
        y.topk(2)
        y[torch.tensor([0, 1])]
    assert syncs.count == 7, syncs.calls


def _tiny_step_setup():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=resnet18", "data.height=32", "data.width=16", "train.log_every=1000",
                             "train.batch_size=8"])
    model = build_model(cfg.model)
    n, cameras = 64, 4
    cams = torch.arange(n) % cameras
    tracklets = torch.arange(n) // 8 + 100 * cams
    bank = MemoryBank(torch.arange(n), cams, tracklets, model.dim, cameras)
    bank.fill(torch.arange(n), torch.randn(n, model.dim))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = []
    for _ in range(4):
        rows = torch.randperm(n)[:8]
        batches.append((torch.randn(8, 3, 32, 16), cams[rows], tracklets[rows], rows))
    return cfg, model, bank, optimizer, batches


def test_a_training_step_makes_one_host_synchronisation_outside_logging():
    cfg, model, bank, optimizer, batches = _tiny_step_setup()
    env = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    for warmup in (True, False):
        train_one_epoch(model, batches[:1], bank, optimizer, cfg, env, 0, warmup, TrainMeter(env.device, None))
        meter = TrainMeter(env.device, None, None, log_every=1000)
        with count_host_syncs() as syncs:
            train_one_epoch(model, batches, bank, optimizer, cfg, env, 0, warmup, meter)
        in_steps = {k: v for k, v in syncs.calls.items() if "meters.py" not in k}  # the epoch summary, once
        assert sum(in_steps.values()) == len(batches), in_steps  # the step's flag exchange (train.step_flags)
