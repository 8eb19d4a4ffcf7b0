"""The training meter: epoch means of the loss parts, log points, and the mined-positive precision diagnostic."""
import numpy as np
import torch

from reid.meters import TrainMeter


class Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def parts(intra, inter, cam, hard=None, easy=None):
    return {"intra": torch.tensor(intra, dtype=torch.float64), "inter": torch.tensor(inter, dtype=torch.float64),
            "cam": torch.tensor(cam, dtype=torch.float64), "hard_ids": hard, "easy_ids": easy}


def test_epoch_means_and_log_points_every_log_every_steps():
    writer = Writer()
    meter = TrainMeter("cpu", None, writer, log_every=2, step0=100)
    shown = [meter.update(step, parts(step, 2 * step, 1.0), torch.tensor(float(step)), torch.arange(3), False)
             for step in range(5)]
    assert [s is not None for s in shown] == [True, False, True, False, True]
    summary = meter.summary()
    assert summary["intra"] == 2.0 and summary["inter"] == 4.0 and summary["cam"] == 1.0 and summary["loss"] == 2.0
    assert "hard_positive_precision" not in summary  # unlabelled: no diagnostic
    # step 2's point averages the steps since the last point (1 and 2): total 1.5, at global step 102
    assert ("loss/total", 1.5, 102) in writer.scalars and ("loss/intra", 0.0, 100) in writer.scalars


def test_mined_positive_precision_counts_true_identities_and_skips_missing_picks():
    pids = np.array([0, 0, 1, 1, 2, 2])
    meter = TrainMeter("cpu", pids, None, log_every=10)
    rows = torch.tensor([0, 2])
    hard = torch.tensor([[1, 4], [3, -1]])  # anchor 0: 1 right (pid 0), 4 wrong; anchor 2: 3 right, one missing
    easy = torch.tensor([[5, -1], [4, 5]])  # all wrong
    meter.update(0, parts(1.0, 1.0, 1.0, hard, easy), torch.tensor(1.0), rows, warmup=False)
    meter.update(1, parts(1.0, 1.0, 1.0, hard, easy), torch.tensor(1.0), rows, warmup=True)  # warm-up: not counted
    summary = meter.summary()
    assert summary["hard_positive_precision"] == 2 / 3 and summary["easy_positive_precision"] == 0.0
