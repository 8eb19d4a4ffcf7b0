"""`reid bench`: the throughput benchmarks in one command, one readable table per section, optionally JSON.

    reid bench [SECTION ...] [section.key=value ...] [--quick] [--json PATH] [--png PATH] [--device D]

Sections (default: all, in this order):
  step     images/s of the full training step vs the backbone alone (reid/bench_step.py)
  loss     the loss step vs its matmul floor and the naive per-anchor loop (reid/bench_loss.py)
  input    decode + augment images/s per DataLoader worker, batched GPU decode with CUDA (reid/bench_input.py)
  scaling  the distributed loss and full step at 1, 2, 4 ranks (reid/bench_scaling.py)
  eval     exact evaluation at VeRi-Wild large shape (reid/bench_eval.py)
Each section's settings are the dataclasses below (the defaults: real sizes); ``--quick`` swaps in tiny ones
(the whole run in about a minute on 2 CPU cores), and ``step.batch=64``-style overrides change any of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field

from reid.errors import ReidError


@dataclass
class StepSettings:
    sizes: str = "veri776,veriwild"   # memories (reid.bench_common.SIZES)
    divisor: int = 1                  # memory rows divided by this (quick runs)
    arch: str = "resnet50"            # ResNet, last stride 1; D = 2048 (resnet50)
    height: int = 256
    width: int = 128
    batch: int = 128
    reps: int = 5                     # alternated backbone / full steps (2 on CPU)
    seed: int = 0


@dataclass
class LossSettings:
    sizes: str = "veri776,veriwild"
    divisor: int = 1
    batch: int = 128
    dim: int = 2048
    reps: int = 5                     # alternated floor / step (3 on CPU)
    naive_anchors: int = 4            # anchors the per-anchor loop is timed on
    seed: int = 0


@dataclass
class InputSettings:
    images: int = 256                 # JPEGs written and read back
    height: int = 256
    width: int = 128
    reps: int = 3
    gpu_batch: int = 128
    seed: int = 0


@dataclass
class ScalingSettings:
    worlds: str = "1,2,4"
    rows_per_rank: int = 34_725       # VeRi-Wild over 8 ranks
    cameras_per_rank: int = 22
    arch: str = "resnet50"
    height: int = 256
    width: int = 128
    batch: int = 32                   # anchors (images) per rank
    reps: int = 3                     # (2 on CPU)
    seed: int = 0


@dataclass
class EvalSettings:
    queries: int = 1000               # timed, then extrapolated to 10,000
    gallery: int = 128_517
    identities: int = 10_000
    cameras: int = 174
    dim: int = 2048
    repeats: int = 3                  # the fastest of each counts
    check_queries: int = 100          # checked against the full-sort reference
    chunk: int = 0                    # queries per chunk (0: evaluate's automatic choice)
    seed: int = 0


@dataclass
class BenchSettings:
    step: StepSettings = field(default_factory=StepSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    input: InputSettings = field(default_factory=InputSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


SECTIONS = ("step", "loss", "input", "scaling", "eval")

# Tiny shapes: every code path of the real run, in about a minute on 2 CPU cores.
QUICK = {
    "step": {"divisor": 16, "arch": "resnet18", "height": 128, "width": 64, "batch": 32, "reps": 3},
    "loss": {"divisor": 8, "batch": 64, "dim": 512, "reps": 3, "naive_anchors": 2},
    "input": {"images": 48, "reps": 2, "gpu_batch": 48},
    "scaling": {"rows_per_rank": 2_000, "cameras_per_rank": 5, "arch": "resnet18", "height": 64, "width": 32,
                "batch": 8, "reps": 2},
    "eval": {"queries": 256, "gallery": 20_000, "identities": 2_000, "dim": 512, "repeats": 2, "check_queries": 32},
}
CPU_FULL = {"step": {"reps": 2}, "loss": {"reps": 3}, "scaling": {"reps": 2}}  # a ResNet-50 step takes ~30 s


def build_settings(quick: bool, on_cpu: bool, overrides: list[str]) -> BenchSettings:
    """Defaults, then the quick or CPU adjustments, then ``section.key=value`` overrides (ReidError naming an
    unknown key or a bad value)."""
    settings = BenchSettings()
    for table in ([QUICK] if quick else [CPU_FULL] if on_cpu else []):
        for section, values in table.items():
            for key, value in values.items():
                setattr(getattr(settings, section), key, value)
    for item in overrides:
        dotted, _, text = item.partition("=")
        section, _, key = dotted.partition(".")
        group = getattr(settings, section, None) if section in SECTIONS else None
        known = {f.name: f for f in dataclasses.fields(group)} if group is not None else {}
        if key not in known:
            names = ", ".join(f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(settings, s)))
            raise ReidError(f"reid bench: unknown setting '{dotted}', expected one of {names}")
        kind = type(getattr(group, key))
        try:
            setattr(group, key, kind(text))
        except ValueError:
            raise ReidError(f"reid bench: setting '{dotted}': '{text}' given, expected {kind.__name__}") from None
    _validate(settings)
    return settings


def _validate(s: BenchSettings) -> None:
    from reid.bench_common import SIZES
    from reid.model import ARCHS

    for section in ("step", "loss"):
        for name in getattr(s, section).sizes.split(","):
            if name not in SIZES:
                raise ReidError(f"reid bench: setting '{section}.sizes': '{name}' given, expected some of "
                                f"{', '.join(SIZES)} (comma-separated)")
    for section in ("step", "scaling"):
        if getattr(s, section).arch not in ARCHS:
            raise ReidError(f"reid bench: setting '{section}.arch': '{getattr(s, section).arch}' given, "
                            f"expected one of {', '.join(ARCHS)}")
    try:
        worlds = [int(w) for w in s.scaling.worlds.split(",")]
    except ValueError:
        worlds = [0]
    if min(worlds) < 1:
        raise ReidError(f"reid bench: setting 'scaling.worlds': '{s.scaling.worlds}' given, expected rank counts "
                        "like 1,2,4")
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(s, section)):
            value = getattr(getattr(s, section), f.name)
            if isinstance(value, int) and value < (0 if f.name in ("seed", "chunk") else 1):
                raise ReidError(f"reid bench: setting '{section}.{f.name}': {value} given, expected a positive "
                                "integer")
    if s.loss.naive_anchors > s.loss.batch:
        raise ReidError(f"reid bench: setting 'loss.naive_anchors': {s.loss.naive_anchors} given, expected at most "
                        f"loss.batch ({s.loss.batch})")


def machine(device) -> dict:
    import torch
    import torchvision

    from reid.bench_common import cpu_model, usable_cores

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"hostname": socket.gethostname(), "cpu_model": cpu_model(), "cores": usable_cores(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device),
            "device_name": name, "torch_threads": torch.get_num_threads()}


def run_section(name: str, settings: BenchSettings, device, results: dict) -> dict:
    from reid import bench_eval, bench_input, bench_loss, bench_scaling, bench_step

    module = {"step": bench_step, "loss": bench_loss, "input": bench_input, "scaling": bench_scaling,
              "eval": bench_eval}[name]
    if name == "input":
        consumed = max((r["full_images_per_s"] for r in results.get("step", {}).get("sizes", [])), default=None)
        return module.run(settings.input, device, consumed)
    return module.run(getattr(settings, name), device)


def table(name: str, result: dict) -> str:
    from reid import bench_eval, bench_input, bench_loss, bench_scaling, bench_step

    return {"step": bench_step, "loss": bench_loss, "input": bench_input, "scaling": bench_scaling,
            "eval": bench_eval}[name].table(result)


def scaling_png(result: dict | None, path: str) -> str | None:
    """Plots images/s and efficiency against ranks; returns why it was skipped, or None when written."""
    if not result or not result.get("worlds"):
        return "the scaling section did not run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    worlds = result["worlds"]
    ranks = [w["ranks"] for w in worlds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(ranks, [w["full_images_per_s"] for w in worlds], "o-", label="full step")
    left.set(xlabel="ranks", ylabel="images/s (all ranks)", xticks=ranks, title="throughput")
    for key, label in (("full_efficiency", "full step"), ("loss_efficiency", "loss step")):
        right.plot(ranks, [w[key] for w in worlds], "o-", label=label)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="ranks", ylabel="t(1) / t(R)", xticks=ranks, ylim=(0, 1.1), title="weak-scaling efficiency")
    right.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _json_path(value: str) -> str:
    if value and not value.endswith(".json"):
        raise argparse.ArgumentTypeError(f"expected a path ending in .json, got {value!r} (a bare --json goes after "
                                         "the sections and overrides)")
    return value


def _write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reid bench", description=__doc__.split("\n\n")[0],
                                epilog="sections: " + ", ".join(SECTIONS))
    p.add_argument("items", nargs="*", metavar="SECTION|section.key=value",
                   help=f"sections to run (default all: {' '.join(SECTIONS)}) and setting overrides")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every section in about a minute on 2 cores")
    p.add_argument("--json", nargs="?", const="", default=None, type=_json_path, metavar="PATH",
                   help="write machine, versions, settings and every result as JSON to PATH (ending in .json), or "
                        "to benchmarks/results/bench[_SECTIONS][_quick].json when PATH is left out")
    p.add_argument("--png", metavar="PATH", help="the scaling curve (needs matplotlib)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = p.parse_intermixed_args(argv)  # sections and overrides may come after the options
    overrides = [x for x in args.items if "=" in x]
    chosen = [x for x in args.items if "=" not in x]
    unknown = [x for x in chosen if x not in SECTIONS]
    if unknown:
        raise ReidError(f"reid bench: unknown section '{unknown[0]}', expected some of {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if s in chosen] or list(SECTIONS)
    if args.json == "":  # a bare --json: the benchmarks/ convention (benchmarks/README.md)
        name = "_".join(["bench"] + (sections if len(sections) < len(SECTIONS) else []) + ["quick"] * args.quick)
        args.json = os.path.join("benchmarks", "results", name + ".json")

    from reid.dist import select_device

    device = select_device(args.device)
    settings = build_settings(args.quick, device.type == "cpu", overrides)
    report = {"machine": machine(device), "quick": args.quick, "sections_run": sections,
              "settings": {s: dataclasses.asdict(getattr(settings, s)) for s in sections}, "results": {},
              "wall_s": {}}
    m = report["machine"]
    print(f"reid bench on {m['hostname']}: {m['device_name']} ({m['device']}), {m['cores']} cores, "
          f"torch {m['torch']}, torchvision {m['torchvision']}{', quick sizes' if args.quick else ''}", flush=True)
    start = time.perf_counter()
    for name in sections:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        report["results"][name] = run_section(name, settings, device, report["results"])
        report["wall_s"][name] = time.perf_counter() - t0
        print(table(name, report["results"][name]), flush=True)
        print(f"({report['wall_s'][name]:.1f} s)", flush=True)
        if args.json:  # after every section: a long run keeps what it measured
            _write_json(args.json, report)
    report["wall_s"]["total"] = time.perf_counter() - start
    if args.png:
        skipped = scaling_png(report["results"].get("scaling"), args.png)
        report["png"] = {"path": None if skipped else args.png, "skipped": skipped}
        print(f"\npng skipped: {skipped}" if skipped else f"\nwrote {args.png}")
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    print(f"total {report['wall_s']['total']:.1f} s")
    return 0
