"""`reid submit`: run `reid.train.main(cfg)` on SLURM through submitit, requeued on pre-emption or time-out.

    reid submit --config configs/synthetic.yaml --nodes 2 --gpus-per-node 8 --cpus-per-task 10 \\
        --partition gpu --time 4320 output_dir=/checkpoint/$USER/veriwild train.epochs=20

One task per GPU (on CPU: `--tasks-per-node`). Each task calls the same `main(cfg)` as torchrun (STYLE.md:
one entry point, two launchers), where `reid.launcher.launcher_env` turns SLURM's variables into rank, world
size and rendezvous, as it does for slurm/train.sbatch. SLURM sends USR2 `--signal-delay` seconds before
the time limit, and a pre-empting scheduler sends it too; submitit then calls `Trainer.checkpoint()` on
rank 0, which requeues the job. Training writes a checkpoint every epoch (and mid-epoch with
`train.checkpoint_every_min` / `_steps`, which long epochs want) and `main(cfg)` resumes from `output_dir`
on its own, so the requeued job continues from the newest complete checkpoint.

Next to the logs (`<log folder>/<job id>/`, default log folder `<output_dir>/slurm`) go the resolved
config (`config.yaml`) and the command that submitted it (`command.txt`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from reid.errors import ReidError

DEFAULT_ENTRY = "reid.train:main"
MIN_TIME_MIN = 11  # submitit counts every signal as a time-out when the limit is <= 10 min
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding this `reid` package


@dataclass
class SlurmOptions:
    """Resources and bookkeeping for one submission; None = the cluster's default."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    time_min: int = 1440
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "reid"
    log_folder: str | None = None   # default: <output_dir>/slurm
    signal_delay_s: int = 90        # USR2 this long before the time limit: time to leave cleanly
    max_requeue: int = 3            # time-outs that still requeue (pre-emptions always requeue)

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


class Trainer:
    """The submitted callable: one copy runs in every SLURM task.

    `entry` ("module:function") is the training function, `reid.train.main` unless a test swaps it.
    """

    def __init__(self, cfg, entry: str = DEFAULT_ENTRY) -> None:
        self.cfg = cfg
        self.entry = entry

    def __call__(self):
        from reid.launcher import TORCHRUN_VARIABLES

        # The job inherits the submitting shell's environment: a RANK or MASTER_ADDR left there must not
        # shadow SLURM's variables, from which main(cfg) takes rank and rendezvous (reid.launcher.launcher_env).
        for key in TORCHRUN_VARIABLES:
            os.environ.pop(key, None)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # intra-op threads = the CPUs SLURM gave this task, not the node's
            import torch

            torch.set_num_threads(int(cpus))
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)(self.cfg)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 when USR2 arrives; returning a submission requeues the job.

        Nothing to save here: main(cfg) checkpoints every epoch (and every train.checkpoint_every_min) and
        resumes from output_dir.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.cfg, self.entry))


def check_cluster(opts: SlurmOptions) -> None:
    """Everything that can be known wrong before submitting, each as one ReidError line."""
    for tool in ("sbatch", "srun", "sinfo"):
        if shutil.which(tool) is None:
            raise ReidError(f"'{tool}' not found on PATH: submit from a SLURM login node "
                            "(or start the local test cluster with slurm/local/start)")
    if opts.time_min < MIN_TIME_MIN:
        raise ReidError(f"--time: got {opts.time_min} minutes, expected at least {MIN_TIME_MIN} "
                        "(submitit treats every signal as a time-out below that, so pre-emption would count as one)")
    for name in ("nodes", "tasks_per_node"):
        if getattr(opts, name) < 1:
            raise ReidError(f"--{name.replace('_', '-')}: got {getattr(opts, name)}, expected at least 1")
    if opts.signal_delay_s * 1.0 >= opts.time_min * 60:
        raise ReidError(f"--signal-delay: got {opts.signal_delay_s} s, expected less than --time ({opts.time_min} min)")
    if opts.partition is not None:
        known = partitions()
        if opts.partition not in known:
            raise ReidError(f"--partition: got '{opts.partition}', expected one of: {', '.join(known) or '(none)'}")


def partitions() -> list[str]:
    """Partition names from `sinfo` (the default one is marked '*' there)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReidError(f"cannot list partitions with sinfo: {exc}") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise ReidError(f"cannot reach the SLURM controller (sinfo exited {out.returncode}: {first})")
    return [line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()]


def make_executor(opts: SlurmOptions, folder: str):
    """A submitit SlurmExecutor writing its logs to `folder/<job id>/`."""
    import submitit

    executor = submitit.SlurmExecutor(folder=os.path.join(folder, "%j"), max_num_timeout=opts.max_requeue)
    params = dict(
        job_name=opts.job_name, time=opts.time_min, nodes=opts.nodes, ntasks_per_node=opts.tasks_per_node,
        signal_delay_s=opts.signal_delay_s,
        # Explicit, because some clusters make batch jobs non-requeueable by default (JobRequeue=0).
        additional_parameters={"requeue": True},
        # One task failing ends every task of the step at once, instead of leaving them in a collective until
        # its 30-minute timeout; the job then reads FAILED.
        srun_args=["--kill-on-bad-exit=1"],
        # The job unpickles reid.submit.Trainer: let it import the same source tree as the submitter.
        setup=[f"export PYTHONPATH={shlex.quote(SOURCE_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    optional = dict(partition=opts.partition, cpus_per_task=opts.cpus_per_task, account=opts.account,
                    qos=opts.qos, constraint=opts.constraint,
                    gpus_per_node=opts.gpus_per_node or None,
                    mem=None if opts.mem_gb is None else f"{max(1, int(opts.mem_gb * 1024))}M")
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def resolve_paths(cfg) -> None:
    """Relative paths would be read from the job's working directory: pin them to the submitter's."""
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    if cfg.data.root:
        cfg.data.root = os.path.abspath(cfg.data.root)
    if getattr(cfg.model, "pretrained", ""):
        cfg.model.pretrained = os.path.abspath(cfg.model.pretrained)


def submit(cfg, opts: SlurmOptions, command: list[str] | None = None, entry: str = DEFAULT_ENTRY):
    """Check the cluster, submit `Trainer(cfg)` as one job of `opts.num_tasks` tasks; return the submitit Job.

    Writes `config.yaml` and `command.txt` into the job's log folder.
    """
    from reid.config import save_config

    check_cluster(opts)
    resolve_paths(cfg)
    folder = os.path.abspath(opts.log_folder or os.path.join(cfg.output_dir, "slurm"))
    os.makedirs(folder, exist_ok=True)
    executor = make_executor(opts, folder)
    job = executor.submit(Trainer(cfg, entry))
    job_folder = str(job.paths.folder)
    os.makedirs(job_folder, exist_ok=True)
    save_config(cfg, os.path.join(job_folder, "config.yaml"))
    with open(os.path.join(job_folder, "command.txt"), "w") as f:
        f.write(shlex.join(command or [sys.executable, "-m", "reid", "submit"]) + "\n")
    return job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid submit", description="submit reid training to SLURM through submitit "
                                "(requeued on pre-emption or time-out, resumes from the last checkpoint)")
    p.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/synthetic.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. output_dir=/x train.epochs=20")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: --gpus-per-node or 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", type=float, default=None, metavar="GB", help="memory per node in GB")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=1440, metavar="MIN", help=f"time limit in minutes (>= {MIN_TIME_MIN})")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--job-name", default="reid")
    p.add_argument("--log-folder", default=None, help="default: <output_dir>/slurm")
    p.add_argument("--signal-delay", type=int, default=90, metavar="S",
                   help="USR2 this many seconds before the time limit (checkpoint + requeue)")
    p.add_argument("--max-requeue", type=int, default=3, help="time-outs that still requeue the job")
    p.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's final metrics")
    return p


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    tasks = args.tasks_per_node
    if args.gpus_per_node and tasks is not None and tasks != args.gpus_per_node:
        raise ReidError(f"--tasks-per-node: got {tasks} with --gpus-per-node {args.gpus_per_node}, "
                        "expected them equal (one task per GPU) or --tasks-per-node left out")
    return SlurmOptions(
        nodes=args.nodes, tasks_per_node=tasks or args.gpus_per_node or 1, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem, partition=args.partition, time_min=args.time,
        account=args.account, qos=args.qos, constraint=args.constraint, job_name=args.job_name,
        log_folder=args.log_folder, signal_delay_s=args.signal_delay, max_requeue=args.max_requeue)


def _original_error(job, tasks: int, exc: Exception) -> str:
    """The error that ended a job, in one line: a task's ReidError when one raised it (the others then only lost
    their peer), else the last error line submitit reports."""
    texts = []
    for task in range(tasks):
        failure = job.task(task).exception()
        texts.append(str(failure) if failure is not None else "")
    for text in texts + [str(exc)]:
        ours = re.findall(r"\breid\.[\w.]*Error: (.*)", text)  # ReidError and its subclasses, e.g. a corrupt image
        if ours:
            return ours[-1].strip()
    lines = [line.strip() for line in str(exc).splitlines() if "Error:" in line]
    return lines[-1] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """`reid submit ...`; ReidError propagates to the CLI (one line, exit 2)."""
    from reid.config import load_config

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    opts = options_from_args(args)
    cfg = load_config(args.config, args.overrides)  # config errors surface before anything is submitted
    job = submit(cfg, opts, [sys.executable, "-m", "reid", "submit", *argv])
    print(f"submitted job {job.job_id}: {opts.num_tasks} task(s) on {opts.nodes} node(s)\n"
          f"  logs:   {job.paths.folder}\n  output: {cfg.output_dir}")
    if args.wait:
        try:
            results = job.results()  # one entry per task; rank 0 holds the evaluation
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError carry the task's traceback
            raise ReidError(f"SLURM job {job.job_id} failed: {_original_error(job, opts.num_tasks, exc)} "
                            f"(logs in {job.paths.folder})") from None
        final = (results[0] or {}).get("final", {}) if isinstance(results[0], dict) else {}
        print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)))
    return 0
