"""Smoke and unit tests of mnist1d_semi_implicit.py (CPU, tiny settings)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import mnist1d_semi_implicit as m1d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "2", "--batch-size", "512", "--width", "8", "--T", "100", "--eval-strata", "4",
        "--samples-per-class", "5", "--sample-steps", "5", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One MNIST1D cache + evaluation classifier for the whole session."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, data_dir):
    outdir = str(tmp_path_factory.mktemp("sweep"))
    results = m1d.main(["--outdir", outdir, "--data-dir", data_dir, *TINY])
    return outdir, results


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mnist1d_semi_implicit.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_sweep_writes_the_results_contract(sweep):
    outdir, _ = sweep
    with open(os.path.join(outdir, "results.json")) as file:
        results = json.load(file)
    assert [c["name"] for c in results["configs"]] == m1d.ALL_CONFIGS
    for c in results["configs"]:
        for key in ("name", "loss", "noise", "training", "test_mse", "test_mse_forward", "test_mse_inverse", "test_mae",
                    "test_kl", "runtime_s", "convergence_rate", "train_loss", "sample_fd", "sample_accuracy"):
            assert key in c, (c["name"], key)
        assert c["name"] == f"{c['loss']}-{c['noise']}-{c['training']}"
        assert len(c["train_loss"]) == 2 and all(math.isfinite(v) for v in c["train_loss"])
        assert all(math.isfinite(c[k]) for k in ("test_mse", "test_mse_forward", "test_mse_inverse", "test_kl", "sample_fd"))
        assert 0 <= c["sample_accuracy"] <= 1
        assert c["test_mse"] == pytest.approx((c["test_mse_forward"] + c["test_mse_inverse"]) / 2)
        if c["training"] == "semi-implicit":
            assert set(c["train_components"]) == {"forward", "inverse", "rt_fi", "rt_if"}
        else:
            assert set(c["train_components"]) == {"forward"}
    assert results["baselines"]["predict_zero_mse"] > results["baselines"]["class_mean_mse"] > 0
    assert results["reference"]["real_fd"] > 0 and 0.5 < results["reference"]["real_accuracy"] <= 1
    for name in ["config.json", "metrics.jsonl", "report.md", "loss_curves.png", "loss_components.png", "prime_inverse.png",
                 "forward_mse_vs_t.png", *[f"samples_{c}.png" for c in m1d.ALL_CONFIGS]]:
        assert os.path.getsize(os.path.join(outdir, name)) > 0, name
    with open(os.path.join(outdir, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    assert {r["config"] for r in records} == set(m1d.ALL_CONFIGS)
    report = open(os.path.join(outdir, "report.md")).read()
    assert "predict zero" in report and "Real vs real" in report


def test_prime_inverse_targets_are_each_samples_own_transform():
    torch.manual_seed(0)
    x = torch.randn(50, 40)
    y = torch.randint(0, 10, (50,))
    target = m1d.prime_inverse(x, y)
    for i in range(len(x)):
        expected = m1d.PRIME_INVERSES[int(y[i])][1](x[i:i + 1])[0]
        assert torch.allclose(target[i], expected), i
    # the three the user fixed
    row = x[:1]
    assert torch.allclose(m1d.prime_inverse(row, torch.tensor([0])), -row)
    assert torch.allclose(m1d.prime_inverse(row, torch.tensor([1])), torch.roll(row, 10, dims=1))
    assert torch.allclose(m1d.prime_inverse(row, torch.tensor([9])), torch.cos(row * math.pi / 5) + 1)
    # targets follow their own samples when the batch is permuted
    perm = torch.randperm(50)
    assert torch.allclose(m1d.prime_inverse(x[perm], y[perm]), target[perm])


@pytest.mark.parametrize("digit", range(9))
def test_prime_inverses_0_to_8_are_injective(digit):
    """The README calls 0..8 invertible: distinct inputs give distinct outputs."""
    torch.manual_seed(digit)
    x = torch.randn(200, 40) * 2
    out = m1d.PRIME_INVERSES[digit][1](x)
    nudged = m1d.PRIME_INVERSES[digit][1](x + 1e-3 * torch.randn_like(x))
    assert ((out - nudged).abs().amax(1) > 0).all()


@pytest.mark.parametrize("noise", ["gaussian", "convex"])
@pytest.mark.parametrize("loss_kind", ["mse", "kl"])
def test_both_losses_carry_gradient_into_the_model(noise, loss_kind):
    args = m1d.parse_args(["--T", "100"])
    process = common.make_process(noise, 100)
    model = m1d.Denoiser(process, width=8)
    x0, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    loss, parts = m1d.training_losses(model, process, args, loss_kind, True, x0, y, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad.abs().sum().item() for p in model.unet.parameters() if p.grad is not None]
    assert sum(grads) > 0 and all(math.isfinite(g) for g in grads)
    assert set(parts) == {"forward", "inverse", "rt_fi", "rt_if"}


@pytest.mark.parametrize("noise", ["gaussian", "convex"])
def test_kl_forward_loss_is_T_times_the_gaussian_kl(noise):
    """kl loss = T * KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / dims, the KL computed directly."""
    T = 50
    process = common.make_process(noise, T)
    torch.manual_seed(1)
    x0, x0_pred = torch.randn(8, 40, dtype=torch.float64), torch.randn(8, 40, dtype=torch.float64)
    t = torch.randint(2, T + 1, (8,))
    x_t = common.q_sample(process, x0, t, torch.randn_like(x0))
    mean_q, var = common.posterior(process, x0, x_t, t, t - 1)
    mean_p, _ = common.posterior(process, x0_pred, x_t, t, t - 1)
    direct_kl = ((mean_q - mean_p) ** 2 / (2 * var)).sum(1)
    assert torch.allclose(m1d.forward_loss(process, "kl", x0, x0_pred, t), T * direct_kl / 40, rtol=1e-9)


def test_preconditioned_denoiser_is_near_identity_at_small_noise():
    process = common.make_process("gaussian", 1000)
    model = m1d.Denoiser(process, width=8)
    x = torch.randn(4, 40)
    t = torch.ones(4, dtype=torch.long)
    out = model(x, t, torch.zeros(4, dtype=torch.long), torch.full((4,), m1d.NULL_LABEL))
    assert (out - x / process.a[1].float()).abs().max() < 0.05


def test_trivial_baselines_match_direct_computation():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 2.0]])
    data = {"x": torch.cat([x, x]).repeat(1, 20), "y": torch.tensor([0, 0, 1, 0, 0, 1]),
            "x_test": x.repeat(1, 20), "y_test": torch.tensor([0, 0, 1])}
    # class 0 mean is (2, 2); class 1 mean is (0, 2): errors 1, 1 and 0 per element
    baselines = m1d.trivial_baselines(data)
    assert baselines["class_mean_mse"] == pytest.approx(2 / 3)
    assert baselines["predict_zero_mse"] == pytest.approx((1 + 9 + 2) / 3)


def test_convergence_rate_of_exponential_decay():
    rate, epochs_to_90 = m1d.convergence([math.exp(-0.5 * e) for e in range(10)])
    assert rate == pytest.approx(0.5)
    assert epochs_to_90 == 6  # e^{-0.5 e} <= e^{-4.5} + 0.1 (1 - e^{-4.5}) = 0.110 first at e = 5 (the 6th epoch)


def test_resume_after_sigterm_reproduces_uninterrupted_run(tmp_path, data_dir):
    flags = ["--data-dir", data_dir, "--configs", "kl-convex-semi-implicit", "--epochs", "3", "--batch-size", "64",
             "--width", "8", "--T", "100", "--eval-strata", "4", "--samples-per-class", "5", "--sample-steps", "5",
             "--no-progress", "--threads", "1"]
    reference = run_script("--outdir", str(tmp_path / "full"), *flags)
    assert reference.returncode == 0, reference.stderr

    interrupted_dir = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "mnist1d_semi_implicit.py"), "--outdir",
                                str(interrupted_dir), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT)
    for line in process.stdout:  # wait until training has started, then preempt
        if "denoiser with" in line:
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert "received SIGTERM" in output
    run_dir = interrupted_dir / "runs" / "kl-convex-semi-implicit-seed0"
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()

    resumed = run_script("--outdir", str(interrupted_dir), "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stdout
    full = json.load(open(tmp_path / "full" / "results.json"))["configs"][0]
    again = json.load(open(interrupted_dir / "results.json"))["configs"][0]
    assert again["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    for key in ("test_mse_forward", "test_mse_inverse", "test_kl", "sample_fd", "sample_accuracy"):
        assert again[key] == pytest.approx(full[key], rel=1e-6), key


def test_corrupt_and_wrong_kind_checkpoints_give_one_clear_error(tmp_path, data_dir, sweep):
    flags = ["--data-dir", data_dir, *TINY]
    sweep_dir, _ = sweep
    target_dir = tmp_path / "out" / "runs" / "mse-gaussian-implicit-seed0"
    target_dir.mkdir(parents=True)
    (target_dir / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    result = run_script("--outdir", str(tmp_path / "out"), "--resume", "--configs", "mse-gaussian-implicit", *flags)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr

    # a valid checkpoint of another config where this config's belongs
    other = tmp_path / "other" / "runs" / "mse-gaussian-implicit-seed0"
    other.mkdir(parents=True)
    source = m1d.Denoiser(common.make_process("convex", 100), width=8)
    common.save_checkpoint(str(other / "checkpoint.pt"), {"model": source.state_dict(),
                                                          "meta": common.checkpoint_meta(m1d.SCRIPT, "mse-convex-implicit")})
    result = run_script("--outdir", str(tmp_path / "other"), "--resume", "--configs", "mse-gaussian-implicit", *flags)
    assert result.returncode == 2 and "mse-convex-implicit" in result.stderr and "Traceback" not in result.stderr


def test_refuses_to_overwrite_a_run_and_bad_flags(tmp_path, sweep):
    sweep_dir, _ = sweep
    result = run_script("--outdir", sweep_dir, *TINY)
    assert result.returncode == 2 and "--resume" in result.stderr
    result = run_script("--outdir", str(tmp_path), "--epochs", "0")
    assert result.returncode == 2 and "--epochs" in result.stderr
    result = run_script("--outdir", str(tmp_path), "--label-dropout", "1.5")
    assert result.returncode == 2 and "--label-dropout" in result.stderr


def test_check_mode(data_dir):
    result = run_script("--check", "--data-dir", data_dir, "--T", "100", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "pre-flight passed" in result.stdout and "device: cpu" in result.stdout


def test_kl_training_loss_at_t1_is_the_decoder_term_without_its_constant():
    process = common.make_process("gaussian", 100)
    x0, x0_pred = torch.zeros(2, 40, dtype=torch.float64), torch.full((2, 40), 0.01, dtype=torch.float64)
    t = torch.ones(2, dtype=torch.long)
    expected = 100 * (40 * 0.01**2) / (2 * process.b[1] ** 2) / 40
    assert torch.allclose(m1d.forward_loss(process, "kl", x0, x0_pred, t), expected.expand(2))
    assert (m1d.forward_loss(process, "kl", x0, x0_pred, torch.tensor([1, 50])) > 0).all()  # no negative constant


def test_seed_aggregation_reports_mean_and_std():
    def fake(seed, value):
        result = {key: value for key in m1d.SCALARS}
        result.update(name="mse-convex-implicit", loss="mse", noise="convex", training="implicit", seed=seed,
                      train_loss=[value, value / 2], train_components={"forward": [value, value / 2]},
                      forward_mse_by_t={"t": [1.0, 50.0], "mse": [value, 2 * value]}, samples=[], sample_labels=[])
        return result
    entry = m1d.aggregate([fake(0, 1.0), fake(1, 3.0)])
    assert entry["test_mse"] == 2.0 and entry["std"]["test_mse"] == pytest.approx(math.sqrt(2))
    assert entry["train_loss"] == [2.0, 1.0] and entry["seeds"] == [0, 1]
    assert [r["sample_fd"] for r in entry["per_seed"]] == [1.0, 3.0]
