"""SLURM launchers on a real cluster (slurm/local/start brings up a one-node one; .ci/run does it for CI).

Three jobs of 2 CPU tasks (gloo) train a tiny synthetic config, all with the same seed:
- an uninterrupted run through `reid submit` (the reference),
- a run through `reid.submit` pre-empted with USR2 after its first checkpoint, the way `job._interrupt()`
  and a pre-empting scheduler signal it,
- a run of `slurm/train.sbatch` through `sbatch`, whose batch shell gets USR2 and requeues the job.
Both interrupted runs must resume from their checkpoint and end with the reference's metrics.
Waiting on a cluster means polling; no assertion depends on timing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reid.errors import ReidError

REPO = Path(__file__).resolve().parents[1]
HAS_SBATCH = shutil.which("sbatch") is not None
needs_cluster = [pytest.mark.slurm,
                 pytest.mark.skipif(not HAS_SBATCH, reason="sbatch not on PATH: no SLURM client on this machine "
                                    "(slurm/local/start installs one and brings up a local cluster)"),
                 pytest.mark.timeout(300)]

TINY = ["synth.identities=20", "synth.test_identities=10", "synth.cameras=4", "synth.height=32", "synth.width=32",
        "data.height=32", "data.width=32", "data.workers=0", "model.arch=resnet18", "train.epochs=3",
        "train.warmup_epochs=1", "train.batch_size=32", "eval.every=0", "eval.batch_size=64", "device=cpu", "seed=3"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_until(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout_s:.0f} s for {what}")


def job_state(job_id: str) -> str:
    """The job's latest accounting state ('' until slurmdbd knows it); 'CANCELLED by 0' → 'CANCELLED'."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    lines = out.stdout.split()
    return lines[-1] if lines else ""


def final_state(job_id: str, timeout_s: float = 240) -> str:
    """Wait until the job leaves the queue for good (a requeued one passes through REQUEUED and PENDING)."""
    return wait_until(lambda: job_state(job_id) if job_state(job_id) in TERMINAL else "", timeout_s,
                      f"job {job_id} to end")


def requeue_count(job_id: str) -> int:
    """Earlier runs of a requeued job stay in accounting as REQUEUED records."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True)
    return out.stdout.split().count("REQUEUED")


def resumed_epoch(log: str) -> int:
    found = re.findall(r"resumed from epoch (\d+)", log)
    assert found, "the requeued run did not report resuming from a checkpoint"
    return int(found[-1])


def quality(metrics: dict) -> dict:
    """What must not depend on an interruption, flat for pytest.approx: the final evaluation and the per-epoch
    losses (not speeds)."""
    flat = {f"final.{k}": v for k, v in metrics["final"].items() if isinstance(v, (int, float))}
    for e in metrics["epochs"]:
        flat.update({f"epoch{e['epoch']}.{k}": e[k] for k in ("loss", "intra", "inter", "cam") if k in e})
    return flat


@pytest.fixture(scope="module")
def cluster():
    if not HAS_SBATCH:
        pytest.skip("sbatch not on PATH")
    state_conf = Path(os.environ.get("REID_SLURM_STATE", "/tmp/reid-slurm")) / "etc" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists() and state_conf.exists():
        os.environ["SLURM_CONF"] = str(state_conf)
    ping = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True)
    if ping.returncode != 0:
        pytest.fail(f"sbatch is installed but no SLURM controller answers (run slurm/local/start): {ping.stderr.strip()}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # jobs inherit the submitter's environment
    return ping.stdout.split()[0].rstrip("*")  # default partition


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cluster):
    """One synthetic dataset for all jobs, generated here so that no job spends its time on it."""
    from reid.config import load_config
    from reid.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("slurm")
    cfg = load_config(str(REPO / "configs" / "synthetic.yaml"), TINY + [f"data.root={root / 'data'}"])
    ensure_synthetic(cfg.data.root, cfg.synth)
    return root


def overrides(workdir: Path, name: str) -> list[str]:
    return TINY + [f"data.root={workdir / 'data'}", f"output_dir={workdir / name}"]


@pytest.fixture(scope="module")
def reference(workdir, cluster):
    """The uninterrupted 2-task run, submitted the way a user does: `reid submit ... --wait`."""
    from reid.submit import main

    argv = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--tasks-per-node", "2", "--cpus-per-task", "1",
            "--time", "20", "--partition", cluster, "--job-name", "reid-test", "--wait",
            "--log-folder", str(workdir / "logs-reference"), *overrides(workdir, "reference")]
    assert main(argv) == 0
    (job_folder,) = [p for p in (workdir / "logs-reference").iterdir() if p.is_dir() and not p.is_symlink()]
    return job_folder


@pytest.mark.usefixtures("cluster")
class TestSubmititLauncher:
    pytestmark = needs_cluster

    def test_two_task_gloo_job_trains_evaluates_and_leaves_results_and_logs_of_both_tasks(self, reference, workdir):
        import submitit

        job_id = reference.name
        results = submitit.SlurmJob(folder=reference.parent / "%j", job_id=job_id, tasks=(0, 1)).results()
        assert len(results) == 2
        final = results[0]["final"]
        assert 0.0 <= final["mAP"] <= 1.0 and 0.0 <= final["rank1"] <= 1.0
        assert [e["epoch"] for e in results[0]["epochs"]] == [0, 1, 2]
        written_metrics = json.loads((workdir / "reference" / "metrics.json").read_text())
        assert quality(written_metrics) == pytest.approx(quality(results[0]))
        rank0 = (reference / f"{job_id}_0_log.out").read_text(errors="replace")
        rank1 = (reference / f"{job_id}_1_log.out").read_text(errors="replace")
        assert "2 rank(s)" in rank0 and "mAP" in rank0
        assert "global_rank=0(2)" in rank0 and "global_rank=1(2)" in rank1
        for log in (rank0, rank1):
            assert "Job completed successfully" in log
        # Next to the logs: the resolved config and the command that submitted it.
        written = (reference / "config.yaml").read_text()
        assert f"output_dir: {workdir / 'reference'}" in written and "epochs: 3" in written
        assert "submit" in (reference / "command.txt").read_text()
        assert final_state(job_id) == "COMPLETED"

    def test_a_failing_task_ends_the_job_as_failed_with_its_error_not_a_hang(self, workdir, cluster, tmp_path):
        """A corrupt image on rank 1's cameras: srun --kill-on-bad-exit ends rank 0 at once and the job reads
        FAILED; `reid submit --wait` names the original error in one line."""
        import shutil

        import numpy as np

        from reid.data.readers import load_dataset
        from reid.data.sampler import partition_cameras
        from reid.errors import ReidError
        from reid.submit import main

        data = tmp_path / "data"
        shutil.copytree(workdir / "data", data)
        train = load_dataset("veri776", str(data)).train
        victim = train.paths[int(np.flatnonzero(np.isin(train.cams, partition_cameras(np.bincount(train.cams),
                                                                                      2)[1]))[0])]
        with open(victim, "wb") as f:
            f.write(b"not a picture")
        argv = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--tasks-per-node", "2", "--cpus-per-task",
                "1", "--time", "20", "--partition", cluster, "--job-name", "reid-test", "--wait",
                "--log-folder", str(tmp_path / "logs"), *TINY, f"data.root={data}", f"output_dir={tmp_path / 'run'}"]
        with pytest.raises(ReidError, match=r"SLURM job \d+ failed: .*corrupt or unreadable image"):
            main(argv)
        (job_folder,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir() and not p.is_symlink()]
        assert final_state(job_folder.name) == "FAILED"

    def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint_with_the_same_final_metrics(
            self, reference, workdir, cluster):
        from reid.submit import SlurmOptions, submit
        from reid.config import load_config

        cfg = load_config(str(REPO / "configs" / "synthetic.yaml"), overrides(workdir, "preempted"))
        opts = SlurmOptions(tasks_per_node=2, cpus_per_task=1, time_min=20, partition=cluster, job_name="reid-test",
                            log_folder=str(workdir / "logs-preempted"))
        job = submit(cfg, opts)
        wait_until(lambda: (workdir / "preempted" / "checkpoint.pt").exists() or job.done(), 240,
                   "the first epoch's checkpoint")
        assert not job.done(), "the job ended before it could be pre-empted"
        job._interrupt()  # SIGTERM then USR2 to every task, as a pre-empting cluster does
        results = job.results()

        log = Path(job.paths.stdout).read_text(errors="replace")  # rank 0: both runs appended to one file
        assert "Calling checkpoint method" in log and f"Requeued job {job.job_id}" in log
        assert resumed_epoch(log) >= 1  # not from scratch
        assert final_state(job.job_id) == "COMPLETED" and requeue_count(job.job_id) >= 1
        reference_metrics = json.loads((workdir / "reference" / "metrics.json").read_text())
        assert quality(results[0]) == pytest.approx(quality(reference_metrics), rel=1e-5, abs=1e-6)


@pytest.mark.usefixtures("cluster")
class TestSbatchTemplate:
    pytestmark = needs_cluster

    def test_sbatch_template_traps_usr2_requeues_and_resumes_with_the_same_final_metrics(
            self, reference, workdir, cluster):
        out_dir = workdir / "sbatch"
        log = workdir / "sbatch-%j.out"
        env = dict(os.environ, REID_PYTHON=sys.executable)
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--partition={cluster}", "--ntasks-per-node=2", "--cpus-per-task=1",
             "--time=20", "--job-name=reid-test", f"--output={log}", str(REPO / "slurm" / "train.sbatch"),
             "--config", str(REPO / "configs" / "synthetic.yaml"), *overrides(workdir, "sbatch")],
            capture_output=True, text=True, env=env, cwd=workdir, check=True)
        job_id = submitted.stdout.strip().split(";")[0]
        wait_until(lambda: (out_dir / "checkpoint.pt").exists() or job_state(job_id) in TERMINAL, 240,
                   "the first epoch's checkpoint")
        assert job_state(job_id) not in TERMINAL, "the job ended before it could be signalled"
        # What --signal=B:USR2@90 does before the time limit: USR2 to the batch shell only.
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
        state = final_state(job_id)

        text = Path(str(log).replace("%j", job_id)).read_text(errors="replace")  # both tasks share it
        assert state == "COMPLETED", text[-2000:]
        assert "caught USR2" in text and "(restart 1)" in text
        assert resumed_epoch(text) >= 1
        assert requeue_count(job_id) >= 1
        metrics = json.loads((out_dir / "metrics.json").read_text())
        reference_metrics = json.loads((workdir / "reference" / "metrics.json").read_text())
        assert quality(metrics) == pytest.approx(quality(reference_metrics), rel=1e-5, abs=1e-6)


class TestErrorsBeforeSubmitting:
    """Each is one line on stderr from `reid submit`, exit status 2, and nothing reaches the queue."""

    def submit(self, capsys, argv):
        from reid.cli import main

        code = main(["submit", *argv])
        err = capsys.readouterr().err.strip()
        return code, err

    def test_no_sbatch_on_path_is_one_line(self, capsys, monkeypatch, tmp_path):
        monkeypatch.setenv("PATH", str(tmp_path))
        code, err = self.submit(capsys, [f"output_dir={tmp_path / 'run'}"])
        assert code == 2 and err.count("\n") == 0
        assert "'sbatch' not found on PATH" in err
        assert not (tmp_path / "run").exists()

    def test_config_error_is_one_line(self, capsys, tmp_path):
        code, err = self.submit(capsys, ["train.epochz=3", f"output_dir={tmp_path / 'run'}"])
        assert code == 2 and err.count("\n") == 0 and "train.epochz" in err

    def test_time_limit_below_submitit_minimum_is_refused(self, capsys, monkeypatch, tmp_path):
        for tool in ("sbatch", "srun", "sinfo"):  # fake client: the check must stop before running any
            (tmp_path / tool).write_text("#!/bin/sh\nexit 1\n")
            (tmp_path / tool).chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        code, err = self.submit(capsys, ["--time", "10", f"output_dir={tmp_path / 'run'}"])
        assert code == 2 and "--time: got 10 minutes, expected at least 11" in err

    @pytest.mark.slurm
    @pytest.mark.skipif(not HAS_SBATCH, reason="sbatch not on PATH: no SLURM client on this machine")
    def test_unknown_partition_is_one_line_naming_the_known_ones(self, capsys, cluster, tmp_path):
        code, err = self.submit(capsys, ["--partition", "nosuchpartition", f"output_dir={tmp_path / 'run'}"])
        assert code == 2 and err.count("\n") == 0
        assert "--partition: got 'nosuchpartition', expected one of:" in err and cluster in err
        assert not (tmp_path / "run").exists()


def _launcher_seen_by_main(cfg):
    from reid.launcher import launcher_env

    return launcher_env()


def test_submitit_task_takes_rank_and_rendezvous_from_slurm_not_from_the_submitting_shell(tmp_path, monkeypatch):
    """Variables inherited from the shell that ran `reid submit` (a torchrun RANK, a MASTER_ADDR) are dropped, so
    main(cfg) sees SLURM's task, the allocation's first node and the job's port (reid.launcher.launcher_env)."""
    from reid.config import load_config
    from reid.launcher import LauncherEnv
    from reid.submit import Trainer

    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu-a[01-02]" ] && echo gpu-a01 gpu-a02\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "login-1", "MASTER_PORT": "29500"}
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "gpu-a[01-02]"}
    for key, value in {**stale, **slurm}.items():
        monkeypatch.setenv(key, value)

    seen = Trainer(load_config(None, []), entry=f"{__name__}:_launcher_seen_by_main")()
    assert seen == LauncherEnv("slurm", 5, 1, 8, "gpu-a01", 15000 + (1234 * 16 + 2) % 20000)


def test_checkpoint_requeues_the_same_training():
    from reid.submit import Trainer
    from reid.config import load_config

    trainer = Trainer(load_config(None, ["train.epochs=2"]))
    again = trainer.checkpoint()
    assert again.function.cfg.train.epochs == 2 and again.function.entry == "reid.train:main"
    assert again.function is not trainer


def test_flags_become_sbatch_lines_with_requeue_and_the_preemption_signal(tmp_path, monkeypatch):
    from reid.submit import build_parser, make_executor, options_from_args

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's executor only looks for srun; nothing runs
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    args = build_parser().parse_args(["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "64",
                                      "--partition", "gpu", "--time", "600", "--account", "proj", "--qos", "high",
                                      "--constraint", "a100", "--job-name", "veriwild", "--signal-delay", "120"])
    opts = options_from_args(args)
    assert opts.num_tasks == 8  # one task per GPU
    script = make_executor(opts, str(tmp_path / "logs"))._make_submission_file_text("true", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=65536M",
                 "--partition=gpu", "--time=600", "--account=proj", "--qos=high", "--constraint=a100",
                 "--job-name=veriwild", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --requeue\n" in script


def test_tasks_per_node_must_match_gpus_per_node():
    from reid.submit import build_parser, options_from_args

    with pytest.raises(ReidError, match="--tasks-per-node: got 2 with --gpus-per-node 4"):
        options_from_args(build_parser().parse_args(["--gpus-per-node", "4", "--tasks-per-node", "2"]))
