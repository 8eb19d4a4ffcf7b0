"""Where this process sits in its job, read from the launcher's environment: torchrun's variables or SLURM's
(rank, local rank, world size, rendezvous address and port). Pure parsing, no process group:
``reid.dist.init_distributed`` joins the group these describe.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from reid.errors import ReidError

__all__ = ["TORCHRUN_VARIABLES", "LauncherEnv", "launcher_env"]

# What torchrun sets for each process; a SLURM launcher drops copies inherited from the submitting shell so
# that SLURM's own variables decide (launcher_env reads torchrun's first).
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LauncherEnv:
    """This process's place in the job and the rendezvous of its process group (None with one process)."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None


def _int_var(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key, "")
    if value == "" and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ReidError(f"launcher environment: {key}='{value}', expected an integer") from None


def _first_node(environ: Mapping[str, str]) -> str:
    """The allocation's first node (`scontrol show hostnames` expands SLURM's compressed list, e.g. gpu[01-04])."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ReidError("SLURM environment: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set, "
                        "expected one of them to find the rendezvous node")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise ReidError(f"SLURM environment: `scontrol show hostnames {nodelist}` failed ({e}), "
                        "expected it to list the nodes (or set MASTER_ADDR)") from None


def launcher_env(environ: Mapping[str, str] | None = None) -> LauncherEnv | None:
    """Rank, local rank, world size and rendezvous from torchrun's variables or SLURM's; None when neither is set.

    torchrun (RANK and WORLD_SIZE set) wins: torchrun started inside a SLURM task sees both. Under SLURM
    (SLURM_PROCID and SLURM_NTASKS set) the allocation's first node hosts the store, on port
    ``15000 + (SLURM_JOB_ID * 16 + SLURM_RESTART_COUNT) % 20000``: one port per job and per requeue, so a
    requeued run never meets the previous run's socket; two jobs on one node rarely collide (their ids would
    have to differ by a multiple of 1,250), and a collision is a bind error at start, not a mixed-up run.
    MASTER_ADDR / MASTER_PORT set by hand win over the computed ones. Every launcher (torchrun, `reid submit`,
    slurm/train.sbatch, plain srun) ends here; a missing or malformed variable is one ReidError line.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher, rank_, world = "torchrun", _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK", 0)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        launcher, rank_, world = "slurm", _int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_NTASKS")
        local_rank = _int_var(environ, "SLURM_LOCALID", 0)
    else:
        return None
    if world == 1:
        return LauncherEnv(launcher, rank_, local_rank, world, None, None)
    if launcher == "torchrun":
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(key):
                raise ReidError(f"torchrun environment: RANK and WORLD_SIZE are set but {key} is not, "
                                "expected all of them (torchrun sets them together)")
        return LauncherEnv(launcher, rank_, local_rank, world, environ["MASTER_ADDR"],
                           _int_var(environ, "MASTER_PORT"))
    addr = environ.get("MASTER_ADDR") or _first_node(environ)
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT")
    else:
        job, restart = _int_var(environ, "SLURM_JOB_ID", 0), _int_var(environ, "SLURM_RESTART_COUNT", 0)
        port = 15000 + (job * 16 + restart) % 20000
    return LauncherEnv(launcher, rank_, local_rank, world, addr, port)
