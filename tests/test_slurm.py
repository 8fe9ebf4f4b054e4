"""Every sbatch script in slurm/ under a real one-node SLURM (`bash slurm/local_cluster.sh start`; .ci/run starts it),
on tiny settings: each runs to completion and writes its results; the MNIST1D array merges its report; a job
preempted mid-run (SIGUSR1 to the batch step, as SLURM's --signal sends it) checkpoints, requeues itself and resumes
to the uninterrupted run's numbers; train_mnist.sh's two gloo processes equal one process at twice the batch.
Jobs run concurrently where they can (each asks for 1 CPU); every wait is bounded and a test cancels what it started."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import no_diffusion
import test_no_diffusion
import test_text_cfg
from helpers import ROOT

LOCAL_CONF = os.path.join(os.environ.get("LOCAL_SLURM_DIR", "/tmp/diffusion-lab-slurm"), "slurm.conf")
JOB_TIMEOUT = 600  # seconds per job: tens of seconds on an idle 2-core machine


def cluster_environment():
    """The environment for the SLURM commands and the jobs (sbatch passes it on): this interpreter's
    environment first on PATH, one torch thread per 1-CPU job, and local_cluster.sh's config when
    SLURM_CONF is unset. None when no cluster answers."""
    if shutil.which("sbatch") is None:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VENV_DIR": sys.prefix,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    if "SLURM_CONF" not in env and os.path.exists(LOCAL_CONF):
        env["SLURM_CONF"] = LOCAL_CONF
    try:
        answered = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return env if answered.returncode == 0 and answered.stdout.strip() else None


ENV = cluster_environment()
pytestmark = pytest.mark.skipif(ENV is None, reason="no SLURM cluster answers: `bash slurm/local_cluster.sh start` "
                                                    "(as root it installs slurm-wlm) starts one")


@pytest.fixture
def cluster():
    """Submits jobs (sbatch returns at once) and cancels, at the end of the test, those still in the queue."""
    submitted = []

    def submit(script, *args, sbatch=(), env=(), log):
        command = ["sbatch", "--parsable", "--mem=2G", "-c", "1", "--open-mode=append", f"--output={log}",
                   *sbatch, os.path.join("slurm", script), *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, env={**ENV, **{key: str(value) for key, value in dict(env).items()}}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        job = result.stdout.strip().split(";")[0]
        submitted.append(job)
        return job

    yield submit
    if submitted:
        subprocess.run(["scancel", *submitted], env=ENV, capture_output=True, timeout=60)


def squeue(job):
    """The states of a job's (or an array's) tasks still in the queue."""
    result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=ENV, capture_output=True, text=True, timeout=60)
    return result.stdout.split()


def finished(job, log, timeout=JOB_TIMEOUT):
    """Wait until the job (every task of an array) has left the queue; assert each task COMPLETED with exit 0."""
    deadline = time.time() + timeout
    while squeue(job):
        assert time.time() < deadline, f"job {job} still queued after {timeout} s:\n{tail(log)}"
        time.sleep(1)
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=ENV, capture_output=True, text=True, timeout=60)
    records = [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in shown.stdout.splitlines()]
    assert records, shown.stderr
    for record in records:
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), f"job {job}: {record['JobState']}\n{tail(log)}"
    return records


def tail(log, characters=3000):
    """The ends of a job's log files (an array's: every task's, '%a' in the name)."""
    paths = sorted(glob.glob(re.sub(r"%[aAj]", "*", str(log))))
    return "\n".join(f"== {path}\n" + open(path).read()[-characters:] for path in paths)


def preempt_when(job, path, log, timeout=JOB_TIMEOUT):
    """Send SIGUSR1 to the job's batch shell, as SLURM's --signal=B:USR1 does before a time limit, as soon as
    `path` (its first checkpoint) exists, i.e. mid-run."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert squeue(job) and time.time() < deadline, f"job {job} wrote no {path}:\n{tail(log)}"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=ENV, check=True, timeout=60)


def test_every_sbatch_script_is_run_here():
    scripts = {os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "slurm", "*.sh"))}
    helpers_not_jobs = {"requeue.sh", "local_cluster.sh"}
    assert scripts - helpers_not_jobs == {"run_diffusion_mnist1d.sh", "launch_exp.sh", "train_latent.sh", "train_mnist.sh"}


# ----------------------------------------------------------------------------------------------
# MNIST1D: the array and its report; a preempted single-config job

MNIST1D_TINY = ["--width", "8", "--T", "100", "--eval-strata", "4", "--samples-per-class", "5", "--sample-steps", "5",
                "--threads", "1"]


def test_mnist1d_array_runs_every_config_into_one_outdir_and_merges_the_report(cluster, tmp_path):
    outdir, log = tmp_path / "sweep", tmp_path / "array-%a.out"
    job = cluster("run_diffusion_mnist1d.sh", "--data-dir", tmp_path / "data", "--epochs", "1", "--batch-size", "512",
                  *MNIST1D_TINY, sbatch=["--array=0-7"], env={"OUTDIR": outdir}, log=log)
    assert len(finished(job, log)) == 8
    results = json.loads((outdir / "results.json").read_text())
    names = ["mse-gaussian-implicit", "mse-gaussian-semi-implicit", "mse-convex-implicit", "mse-convex-semi-implicit",
             "kl-gaussian-implicit", "kl-gaussian-semi-implicit", "kl-convex-implicit", "kl-convex-semi-implicit"]
    assert sorted(config["name"] for config in results["configs"]) == sorted(names)
    report = (outdir / "report.md").read_text()
    assert all(name in report for name in names)


def test_preempted_mnist1d_job_requeues_resumes_and_ends_with_the_uninterrupted_numbers(cluster, tmp_path):
    flags = ["--data-dir", tmp_path / "data", "--configs", "mse-gaussian-implicit", "--epochs", "12", "--batch-size", "64",
             *MNIST1D_TINY]
    logs = {name: tmp_path / f"{name}.out" for name in ("straight", "preempted")}
    wandb = {"straight": [], "preempted": ["--wandb", "offline"]}  # W&B changes no number
    jobs = {name: cluster("run_diffusion_mnist1d.sh", *flags, *wandb[name], env={"OUTDIR": tmp_path / name,
                                                                                 "WANDB_SILENT": "true"}, log=logs[name])
            for name in logs}
    run = "runs/mse-gaussian-implicit-seed0"
    preempt_when(jobs["preempted"], tmp_path / "preempted" / run / "checkpoint.pt", logs["preempted"])
    records = {name: finished(jobs[name], logs[name]) for name in jobs}
    assert records["preempted"][0]["Restarts"] == "1" and records["straight"][0]["Restarts"] == "0"
    log = logs["preempted"].read_text()
    assert "received SIGUSR1: checkpoint saved" in log and "resuming at epoch" in log, log[-3000:]
    straight, resumed = (json.loads((tmp_path / name / run / "result.json").read_text()) for name in logs)
    assert {key: value for key, value in straight.items() if key != "runtime_s"} == \
           {key: value for key, value in resumed.items() if key != "runtime_s"}
    # one W&B run across the requeue: two offline run files (one per process) with the same id; the latest (the
    # one `wandb sync` keeps: it replaces the earlier one's history) holds every epoch once
    import test_wandb
    ((run_id, runs),) = test_wandb.offline_runs(tmp_path / "preempted").items()
    epochs = [items["epoch"] for _, items in test_wandb.history_rows(runs[-1]) if "epoch" in items]
    assert len(runs) == 2 and sorted(epochs) == list(range(1, 13)), epochs


# ----------------------------------------------------------------------------------------------
# no_diffusion (launch_exp.sh): preempted mid-training, requeued, resumed, then the three eval steps

def test_preempted_function_space_job_resumes_to_the_uninterrupted_run_and_evaluates(cluster, tmp_path):
    flags = test_no_diffusion.tiny_args(tmp_path / "unused", tmp_path / "data", "--epochs", "8", "--threads", "1")[2:]
    env = {"SAVEDIR": tmp_path, "EVAL_FLAGS": "--Ntest 8 --val-batch-size 8 --threads 1"}
    logs = {name: tmp_path / f"{name}.out" for name in ("straight", "preempted")}
    jobs = {name: cluster("launch_exp.sh", "json/rbf.json", *flags, sbatch=["--gres=gpu:0"], env={**env, "RUN_ID": name},
                          log=logs[name]) for name in logs}
    runs = {name: tmp_path / name / "rbf" for name in logs}
    preempt_when(jobs["preempted"], runs["preempted"] / "model.pt", logs["preempted"])
    records = {name: finished(jobs[name], logs[name]) for name in jobs}
    assert records["preempted"][0]["Restarts"] == "1", tail(logs["preempted"])
    assert "requeueing job" in logs["preempted"].read_text()
    straight, resumed = (torch.load(runs[name] / "model.pt", weights_only=True) for name in logs)
    assert straight["step"] == resumed["step"]
    assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"])
    results = {name: json.loads((runs[name] / "results.json").read_text()) for name in logs}
    assert all(results["straight"][key] == results["preempted"][key] for key in no_diffusion.METRICS)
    for name in logs:
        assert {"superres.json"} <= set(os.listdir(runs[name] / "eval")), os.listdir(runs[name] / "eval")


# ----------------------------------------------------------------------------------------------
# train_latent.sh: the autoencoder, then latent diffusion on its latents

def test_latent_job_trains_the_autoencoder_then_latent_diffusion(cluster, tmp_path):
    log = tmp_path / "latent.out"
    env = {"DATASET": "mnist5k", "AE_EPOCHS": "1", "EPOCHS": "1", "OUTDIR": tmp_path,
           "AE_FLAGS": f"--channels 8,16,32 --tsne-points 150 --threads 1 --data-dir {tmp_path / 'data'}",
           "LATENT_FLAGS": f"--eval-samples 0 --cache-dir {tmp_path / 'cache'} --hidden-dim 32 --num-blocks 2 "
                           f"--batch-size 128 --threads 1 --data-dir {tmp_path / 'data'}"}
    finished(cluster("train_latent.sh", sbatch=["--gres=gpu:0"], env=env, log=log), log)
    assert json.loads((tmp_path / "ae-conv" / "results.json").read_text())["test_reconstruction_mse"] > 0
    assert (tmp_path / "ae-conv" / "tsne.png").is_file()
    [latent_run] = glob.glob(str(tmp_path / "latent-diffusion-*"))
    assert json.loads(open(os.path.join(latent_run, "results.json")).read())["epochs"] == 1
    assert os.listdir(os.path.join(latent_run, "samples"))  # --generate-images


# ----------------------------------------------------------------------------------------------
# train_mnist.sh: torchrun from SLURM's variables; 2 gloo processes on the CPU

def test_two_process_mnist_job_equals_one_process_at_twice_the_batch(cluster, tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = test_text_cfg.with_untrained_classifier(tmp_path / "data")
    checkpoints = {}
    jobs = {}
    for name, processes, batch, port in (("ddp", 2, 8, 29511), ("single", 1, 16, 29512)):
        flags = test_text_cfg.tiny_args(tmp_path / name, data_dir, "--max-steps", "1", "--batch-size", str(batch),
                                        "--device", "cpu", "--threads", "1")
        env = {"GPUS_PER_NODE": str(processes), "TEXT_ENCODER": "class", "OUTDIR": tmp_path / name,
               "RDZV_PORT": str(port), "FLAGS": " ".join(map(str, flags))}
        jobs[name] = cluster("train_mnist.sh", sbatch=["--gres=gpu:0"], env=env, log=tmp_path / f"{name}.out")
    for name, job in jobs.items():
        finished(job, tmp_path / f"{name}.out")
        checkpoints[name] = torch.load(tmp_path / name / "checkpoints" / "final.pt", weights_only=True)
    assert "nodes 1 x 2 processes" in (tmp_path / "ddp.out").read_text()
    test_text_cfg.assert_one_step_of_two_processes_equals_one_process(checkpoints["ddp"], checkpoints["single"])
