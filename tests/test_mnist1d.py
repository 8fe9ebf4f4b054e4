"""Smoke and unit tests of mnist1d_semi_implicit.py (CPU, tiny settings)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import helpers
import mnist1d_semi_implicit as m1d
from helpers import ROOT

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


def run_script(*args, timeout=900):  # generous: seconds on an idle machine, minutes on a loaded one
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


def invert_exactly(transform, y, span=8.0):
    """Recover x from y = transform(x) for any transform that is element-wise up to a fixed permutation
    of positions (every prime inverse has that form), or raise AssertionError saying why it cannot.

    1. Coupling: nudging input position j may change exactly one output position pi(j), and pi must be a
       permutation. 2. Each position's scalar map v -> transform(v e_j)[pi(j)] on a fine grid over
       [-span, span] must be strictly monotone: then, and only then, it is injective there. 3. Invert it
       by bisection (float64, 60 halvings). Not-invertible maps (x**2, cos) fail at step 2."""
    dims = y.shape[-1]
    base = torch.zeros(1, dims, dtype=torch.float64)
    nudged = base + 0.37 * torch.eye(dims, dtype=torch.float64)  # row j: position j nudged
    changed = (transform(nudged) - transform(base)).abs() > 1e-12
    assert (changed.sum(1) == 1).all(), "not element-wise up to a permutation: cannot check invertibility"
    pi = changed.float().argmax(1)
    assert sorted(pi.tolist()) == list(range(dims)), "positions collide: not invertible"
    grid = torch.linspace(-span, span, 4001, dtype=torch.float64)
    values = transform(grid[:, None].expand(-1, dims).contiguous())[:, pi]  # (grid, dims): position j's scalar map
    steps = values.diff(dim=0)
    increasing = (steps > 0).all(0)
    decreasing = (steps < 0).all(0)
    assert (increasing | decreasing).all(), "a position's scalar map is not strictly monotone: not injective"
    direction = torch.where(increasing, 1.0, -1.0).double()
    lo = torch.full(y.shape, -span, dtype=torch.float64)
    hi = torch.full(y.shape, span, dtype=torch.float64)
    target = y[:, pi]  # target[:, j] is what position j must produce
    for _ in range(60):
        mid = (lo + hi) / 2
        above = direction * (transform(mid)[:, pi] - target) > 0
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("digit", range(9))
def test_prime_inverses_0_to_8_are_exactly_invertible(digit):
    """The README calls 0..8 invertible: x is recovered from prime(x) to 1e-9 over signals in [-6, 6]
    (MNIST1D values lie within about +-4)."""
    transform = m1d.PRIME_INVERSES[digit][1]
    x = (torch.rand(200, 40, generator=torch.Generator().manual_seed(digit), dtype=torch.float64) - 0.5) * 12
    recovered = invert_exactly(transform, transform(x))
    assert (recovered - x).abs().max() < 1e-9


@pytest.mark.parametrize("name,transform", [("digit 9", m1d.PRIME_INVERSES[9][1]), ("x**2", lambda x: x**2),
                                            ("sum of neighbours", lambda x: x + torch.roll(x, 1, dims=-1))])
def test_the_invertibility_check_rejects_non_invertible_maps(name, transform):
    x = torch.randn(10, 40, dtype=torch.float64)
    with pytest.raises(AssertionError, match="not"):
        invert_exactly(transform, transform(x))


def forward_gradient(model, process, args, loss_kind, semi_implicit, x0, y):
    """Gradient of the total training loss w.r.t. the UNet weights, flattened."""
    model.zero_grad()
    loss, parts = m1d.training_losses(model, process, args, loss_kind, semi_implicit, x0, y, torch.Generator().manual_seed(0))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.unet.parameters()]), parts


@pytest.mark.parametrize("noise", ["gaussian", "convex"])
@pytest.mark.parametrize("loss_kind", ["mse", "kl"])
def test_both_losses_carry_gradient_into_the_model(noise, loss_kind):
    """The forward loss itself must move the weights: in implicit training it is the only loss, and in
    semi-implicit training changing its weight must change the gradient by exactly that weight times
    its own gradient. Detaching the forward loss fails both checks."""
    args = m1d.parse_args(["--T", "100"])
    process = common.make_process(noise, 100)
    torch.manual_seed(0)
    model = m1d.Denoiser(process, width=8)
    torch.nn.init.normal_(model.unet.head[-1].weight, std=0.1)  # a non-zero output so every layer gets gradient
    x0, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    implicit, parts = forward_gradient(model, process, args, loss_kind, False, x0, y)
    assert set(parts) == {"forward"}
    assert implicit.abs().sum() > 0 and torch.isfinite(implicit).all()
    semi, parts = forward_gradient(model, process, args, loss_kind, True, x0, y)
    assert set(parts) == {"forward", "inverse", "rt_fi", "rt_if"}
    args.weight_forward = 3.0
    semi_3, _ = forward_gradient(model, process, args, loss_kind, True, x0, y)
    # total = w_f * forward + others: d total / d w_f = the forward loss's gradient = the implicit one
    torch.testing.assert_close((semi_3 - semi) / 2, implicit, rtol=1e-3, atol=1e-6)
    # and each of the other three losses moves the weights too: raising its weight by 2 changes the gradient
    # by twice its own gradient, which is zero if that loss were detached
    for weight in ("weight_inverse", "weight_rt_fi", "weight_rt_if"):
        args = m1d.parse_args(["--T", "100"])
        setattr(args, weight, getattr(args, weight) + 2.0)
        raised, _ = forward_gradient(model, process, args, loss_kind, True, x0, y)
        own = (raised - semi) / 2
        assert torch.isfinite(own).all() and own.norm() > 1e-3 * semi.norm(), weight


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


@pytest.mark.parametrize("noise", ["gaussian", "convex"])
def test_forward_direction_is_edm_preconditioned(noise):
    """x0_hat = c_skip x + c_out F(c_in x) with EDM's coefficients for sigma = b / a (Karras et al. 2022,
    Table 1), written here as c_skip = a / (a^2 + b^2), c_out = b / sqrt(a^2 + b^2), c_in = 1 / sqrt(a^2 + b^2)
    (sigma_data = 1). The UNet is replaced by a recording stub, so the test pins every coefficient at small,
    middle and large t; at large t c_skip is far from 1, so a plain identity fails. The inverse direction
    is the raw network output."""
    process = common.make_process(noise, 1000)
    model = m1d.Denoiser(process, width=8)
    seen = []

    class Stub(torch.nn.Module):
        def forward(self, h, emb):  # h: (B, 1, 40)
            seen.append(h[:, 0].clone())
            return torch.full_like(h, 0.3)
    model.unet = Stub()
    x = torch.randn(3, 40)
    for t_value in (1, 500, 999):
        a, b = process.a[t_value].item(), process.b[t_value].item()
        norm = math.sqrt(a**2 + b**2)
        t = torch.full((3,), t_value)
        out = model(x, t, torch.zeros(3, dtype=torch.long), torch.full((3,), m1d.NULL_LABEL))
        torch.testing.assert_close(seen[-1], x / norm, rtol=1e-5, atol=1e-6)  # c_in x
        torch.testing.assert_close(out, a / norm**2 * x + b / norm * 0.3, rtol=1e-5, atol=1e-6)
        if t_value == 1:  # near identity at small noise, whatever the network outputs (c_out ~ b_1 = 0.006)
            assert (out - x).abs().max() < 0.01
        if t_value == 999:
            assert a / norm**2 < 0.1  # c_skip far from 1: a plain identity fails here
        inverse = model(x, t, torch.ones(3, dtype=torch.long), torch.full((3,), m1d.NULL_LABEL))
        torch.testing.assert_close(seen[-1], x)
        torch.testing.assert_close(inverse, torch.full_like(x, 0.3))


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
    # smoothed (5-epoch centred moving average, shrinking at the ends): s_0 = mean(l_0..l_2) = 0.6581,
    # s_9 = mean(l_7..l_9) = 0.0199; threshold 0.0199 + 0.1 (0.6581 - 0.0199) = 0.0837; s_5 = mean(l_3..l_7)
    # = 0.1041 is above it, s_6 = 0.0631 the first below: the 7th epoch
    assert epochs_to_90 == 7


def test_epochs_to_90pct_is_not_fooled_by_one_noisy_epoch():
    """A KL-like curve: decays by epoch 10, then one spike at the end. Unsmoothed, the final value sets
    the threshold and the answer is epoch 2; smoothed, it stays near the true decay time (7 without the spike)."""
    curve = [math.exp(-0.5 * e) + 0.01 for e in range(30)]
    curve[-1] = 0.6  # one noisy epoch
    _, epochs = m1d.convergence(curve)
    assert 4 <= epochs <= 8


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
    output = process.communicate(timeout=900)[0]
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

    # kill -9 (no handler runs) right after a checkpoint write, then --resume: the same numbers again
    killed_dir = tmp_path / "killed"
    checkpoint = killed_dir / "runs" / "kl-convex-semi-implicit-seed0" / "checkpoint.pt"
    helpers.kill_9_when_written("mnist1d_semi_implicit.py", ["--outdir", str(killed_dir), *flags], checkpoint, timeout=600)
    assert not (checkpoint.parent / "result.json").exists()
    resumed = run_script("--outdir", str(killed_dir), "--resume", *flags)
    assert resumed.returncode == 0 and "resuming at epoch" in resumed.stdout, resumed.stderr
    again = json.load(open(killed_dir / "results.json"))["configs"][0]
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


# ----------------------------------------------------------------------------------------------
# the best linear denoiser, the reference of every forward MSE

PROCESSES = [("gaussian", "cosine"), ("gaussian", "linear"), ("convex", "cosine")]


@pytest.mark.parametrize("noise,schedule", PROCESSES)
def test_linear_denoiser_is_the_exact_posterior_mean_on_gaussian_data(noise, schedule):
    """On Gaussian data x0 ~ N(mu, C) the Wiener filter is E[x0 | x_t]. Checked against an independent
    solve with the true moments, by Monte Carlo (the residual is uncorrelated with x_t, the defining
    property of the posterior mean of jointly Gaussian variables), and its closed-form MSE."""
    T, dims, n = 200, 40, 20000
    process = common.make_process(noise, T, schedule)
    gen = torch.Generator().manual_seed(3)
    mixing = torch.randn(dims, dims, generator=gen, dtype=torch.float64) / math.sqrt(dims)
    covariance = mixing @ mixing.T + 0.05 * torch.eye(dims, dtype=torch.float64)
    mean = torch.randn(dims, generator=gen, dtype=torch.float64)
    root = torch.linalg.cholesky(covariance)
    draw = lambda count: mean + torch.randn(count, dims, generator=gen, dtype=torch.float64) @ root.T
    linear = m1d.LinearDenoiser(draw(n), process)  # moments estimated from n training samples
    x0 = draw(n)
    for t_value in (20, 100, 180):
        a, b = process.a[t_value].item(), process.b[t_value].item()
        x_t = a * x0 + b * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        t = torch.full((n,), t_value)
        estimate = linear(x_t, t)
        exact = mean + (a * covariance @ torch.linalg.solve(a**2 * covariance + b**2 * torch.eye(dims, dtype=torch.float64),
                                                            (x_t - a * mean).T)).T
        mse = (estimate - x0).pow(2).mean().item()
        exact_mse = (exact - x0).pow(2).mean().item()
        assert abs(mse - exact_mse) < 0.01 * exact_mse + 1e-4  # moments from 20k samples: within 1%
        residual = x0 - estimate
        cross = (residual - residual.mean(0)).T @ (x_t - x_t.mean(0)) / n  # (dims, dims), ~0 up to sampling error
        assert cross.abs().max() < 6 * math.sqrt(residual.var(0).max().item() * x_t.var(0).max().item() / n) + 1e-3
        closed = linear.expected_mse()[t_value].item()
        assert mse == pytest.approx(closed, rel=0.03)


@pytest.mark.parametrize("noise,schedule", PROCESSES)
def test_linear_denoiser_is_the_least_squares_affine_fit_on_mnist1d(data_dir, noise, schedule):
    """Brute force on the real data: the best affine map x_t -> x0 fitted by least squares on the training
    signals (25 noise draws each) scores the same test MSE as the closed-form filter, never better by
    more than sampling error."""
    data = m1d.load_mnist1d(data_dir)
    process = common.make_process(noise, 100, schedule)
    linear = m1d.LinearDenoiser(data["x"], process)
    gen = torch.Generator().manual_seed(4)
    x0 = data["x"].double().repeat(25, 1)
    test = data["x_test"].double()
    for t_value in (10, 40, 70):
        a, b = process.a[t_value].item(), process.b[t_value].item()
        x_t = a * x0 + b * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        design = torch.cat([x_t, torch.ones(len(x_t), 1, dtype=torch.float64)], 1)
        weights = torch.linalg.lstsq(design, x0).solution  # (41, 40)
        test_t = a * test + b * torch.randn(test.shape, generator=gen, dtype=torch.float64)
        fitted = torch.cat([test_t, torch.ones(len(test), 1, dtype=torch.float64)], 1) @ weights
        fitted_mse = (fitted - test).pow(2).mean().item()
        linear_mse = (linear(test_t, torch.full((len(test),), t_value)) - test).pow(2).mean().item()
        assert linear_mse == pytest.approx(fitted_mse, rel=0.01), (t_value, linear_mse, fitted_mse)


def test_mid_noise_band_is_where_the_linear_mse_is_between_the_bounds(data_dir):
    data = m1d.load_mnist1d(data_dir)
    linear = m1d.LinearDenoiser(data["x"], common.make_process("gaussian", 1000))
    band = m1d.mid_noise_band(linear)
    expected = linear.expected_mse()
    inside = torch.nonzero(band).flatten()
    assert len(inside) > 50 and (inside.diff() == 1).all()  # one contiguous range of t
    assert ((expected[band] >= 0.05) & (expected[band] <= 0.5)).all()
    assert expected[inside[0] - 1] < 0.05 and expected[inside[-1] + 1] > 0.5


def load_ema_model(run_dir, noise, T=100, width=8):
    checkpoint = common.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), script=m1d.SCRIPT)
    model = m1d.Denoiser(common.make_process(noise, T), width)
    model.load_state_dict(checkpoint["ema"]["model"])
    return model.eval()


def test_sweep_reports_every_forward_mse_against_the_linear_denoiser_on_the_test_split(sweep, data_dir):
    """The contract of the references, and that every test metric comes from the test split: evaluating
    the saved EMA model and the linear filter on a copy of the data whose training split is NaN gives
    exactly the stored numbers (it would be NaN, or different, if evaluation touched the training split)."""
    outdir, results = sweep
    baselines = results["baselines"]
    data = m1d.load_mnist1d(data_dir)
    args = m1d.parse_args(["--outdir", outdir, *TINY])
    poisoned = {**data, "x": torch.full_like(data["x"], float("nan")), "y": torch.full_like(data["y"], 3)}
    assert baselines["predict_zero_mse"] == pytest.approx(data["x_test"].pow(2).mean().item())
    for noise in ("gaussian", "convex"):
        reference = baselines["linear_denoiser"][noise]
        assert baselines["linear_denoiser_mse"][noise] == reference["mse"]
        assert reference["mse"] < baselines["class_mean_mse"]  # the linear filter is a real reference
        lo, hi = reference["band_t"]
        assert baselines["mid_noise_band"][noise] == [lo, hi] and 1 <= lo < hi <= 100
        process = common.make_process(noise, 100)
        linear = m1d.LinearDenoiser(data["x"], process)  # moments from the training split only
        band = m1d.mid_noise_band(linear)
        again = m1d.evaluate(linear, process, {**poisoned, "x": data["x"]}, args, torch.device("cpu"), band=band,
                             forward_only=True)
        assert again["test_mse_forward"] == pytest.approx(reference["mse"], rel=1e-9)
        for c in (c for c in results["configs"] if c["noise"] == noise):
            assert c["forward_mse_by_t"]["t"] == reference["mse_by_t"]["t"]  # the same t grid
            assert c["linear_ratio"] == pytest.approx(c["test_mse_forward"] / reference["mse"])
            assert c["linear_ratio_band"] == pytest.approx(c["test_mse_forward_band"] / reference["band_mse"])
            model = load_ema_model(os.path.join(outdir, "runs", f"{c['name']}-seed0"), noise)
            metrics = m1d.evaluate(model, process, poisoned, args, torch.device("cpu"), band=band)
            for key in ("test_mse_forward", "test_mse_inverse", "test_kl", "test_mse_forward_band"):
                assert metrics[key] == pytest.approx(c[key], rel=1e-6), (c["name"], key)
    report = open(os.path.join(outdir, "report.md")).read()
    assert "best linear denoiser" in report and "mid-noise band" in report
    ranked = [line for line in report.splitlines() if line.startswith("- test_mse:") or line.startswith("- test_mse_inverse:")]
    assert len(ranked) == 2 and all("semi-implicit" in line for line in ranked)  # implicit configs never train the inverse
    assert "- convergence_rate" not in report


# ----------------------------------------------------------------------------------------------
# --resume: a run identity, metrics.jsonl without repeated steps

ONE = ["--configs", "mse-gaussian-implicit", *TINY]


class StopAtOnce:
    """Stands in for common.StopSignal: as if SIGTERM arrived before the first step."""
    received = "SIGTERM"

    def close(self):
        pass


def test_resume_refuses_other_settings_naming_the_flags(tmp_path, data_dir, monkeypatch):
    outdir = str(tmp_path / "run")
    base = ["--outdir", outdir, "--data-dir", data_dir, *ONE]
    monkeypatch.setattr(common, "StopSignal", StopAtOnce)
    with pytest.raises(SystemExit) as stopped:  # checkpoint after the first step, clean exit
        m1d.main(base)
    assert stopped.value.code == 0
    monkeypatch.undo()
    with open(os.path.join(outdir, "metrics.jsonl"), "a") as file:  # as if logged after the checkpoint, then killed
        file.write(json.dumps({"config": "mse-gaussian-implicit", "seed": 0, "step": 7, "train/loss": 9.0}) + "\n")
    for flags, named in [(["--lr", "0.01"], "--lr 0.002 (now 0.01)"), (["--batch-size", "128"], "--batch-size 512"),
                         (["--schedule", "linear"], "--schedule cosine"), (["--epochs", "3"], "--epochs 2 (now 3)")]:
        with pytest.raises(common.UserError, match="checkpoint.pt was run with") as error:
            m1d.main([*base, "--resume", *flags])
        assert named in str(error.value) and "\n" not in str(error.value)
    results = m1d.main([*base, "--resume"])  # the same settings: continues
    assert len(results["configs"][0]["train_loss"]) == 2
    with open(os.path.join(outdir, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    keys = [(r["config"], r["seed"], r["step"]) for r in records if "train/loss" in r]
    assert len(keys) == len(set(keys)) == 2 and 9.0 not in [r["train/loss"] for r in records if "train/loss" in r]
    # a finished config is reused only with the same settings
    with pytest.raises(common.UserError, match="result.json was run with --T 100 \\(now 50\\)"):
        m1d.main([*base, "--resume", "--T", "50"])
    again = m1d.main([*base, "--resume"])
    assert again["configs"][0]["test_mse_forward"] == results["configs"][0]["test_mse_forward"]


def test_resume_with_nothing_to_resume_says_so(tmp_path, data_dir, capsys):
    m1d.main(["--outdir", str(tmp_path), "--data-dir", data_dir, "--resume", *ONE])
    assert "nothing to resume" in capsys.readouterr().out


def test_aggregate_survives_seeds_with_curves_of_different_length():
    def fake(seed, epochs):
        result = {key: 1.0 for key in m1d.SCALARS}
        result.update(name="kl-convex-implicit", loss="kl", noise="convex", training="implicit", seed=seed,
                      train_loss=[1.0] * epochs, train_components={"forward": [1.0] * epochs},
                      forward_mse_by_t={"t": [1.0], "mse": [1.0]}, samples=[], sample_labels=[])
        return result
    entry = m1d.aggregate([fake(0, 5), fake(1, 3)])
    assert entry["train_loss"] == [1.0] * 3 and entry["curve_epochs"] == 3
    assert entry["train_components"]["forward"] == [1.0] * 3


def test_samples_without_a_frechet_distance_are_reported_not_raised():
    """A diverged model's NaN samples have no FD: the run reports why, aggregation and ranking skip it."""
    classifier = m1d.Classifier().eval()
    real = classifier.features(torch.randn(200, 40)).detach().numpy()
    samples, labels = torch.full((50, 40), float("nan")), torch.zeros(50, dtype=torch.long)
    distance, reason, accuracy = m1d.sample_quality(classifier, samples, labels, real)
    assert distance is None and "non-finite" in reason and 0 <= accuracy <= 1
    distance, reason, _ = m1d.sample_quality(classifier, torch.randn(50, 40), labels, real)
    assert distance > 0 and reason is None

    def fake(seed, fd):
        result = {key: 1.0 for key in m1d.SCALARS}
        result.update(name="mse-gaussian-implicit", loss="mse", noise="gaussian", training="implicit", seed=seed,
                      sample_fd=fd, train_loss=[1.0], train_components={}, forward_mse_by_t={"t": [1.0], "mse": [1.0]},
                      samples=[], sample_labels=[])
        return result
    entry = m1d.aggregate([fake(0, None), fake(1, 30.0)])
    assert math.isnan(entry["sample_fd"]) and entry["test_mse"] == 1.0
    assert m1d.exceeds_spread(entry, m1d.aggregate([fake(0, 30.0), fake(1, 31.0)]), "sample_fd") is None


def test_exceeds_spread_is_welchs_t_test():
    """3 seeds each: a difference of 2.5 standard errors is within the spread (Welch's t quantile at ~4
    degrees of freedom is 2.78), 3.5 standard errors exceed it; the same rule as scipy's ttest_ind."""
    from scipy import stats
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(0, 1, 3), rng.normal(rng.uniform(0, 4), rng.uniform(0.5, 2), 3)
        entry = lambda x: {"seeds": [0, 1, 2], "fd": float(x.mean()), "std": {"fd": float(x.std(ddof=1))}}
        expected = stats.ttest_ind(a, b, equal_var=False).pvalue < 0.05
        assert m1d.exceeds_spread(entry(a), entry(b), "fd") == expected
    fixed = lambda mean: {"seeds": [0, 1, 2], "fd": mean, "std": {"fd": math.sqrt(3 / 2)}}  # SE of the difference: 1
    assert m1d.exceeds_spread(fixed(0.0), fixed(2.5), "fd") is False
    assert m1d.exceeds_spread(fixed(0.0), fixed(3.5), "fd") is True


@pytest.mark.parametrize("flags,named", [
    (["--guidance-scale", "nan"], "--guidance-scale"), (["--guidance-scale", "inf"], "--guidance-scale"),
    (["--threads", "-1"], "--threads"), (["--label-dropout", "0"], "--label-dropout"),
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--ema-decay", "nan"], "--ema-decay"),
    (["--dataset-seed", "-1"], "--dataset-seed"), (["--weight-forward", "0"], "--weight-forward"),
    (["--T", "10", "--eval-strata", "20"], "--eval-strata"),
])
def test_every_bad_flag_is_one_line_before_any_work(flags, named, capsys):
    with pytest.raises(SystemExit) as error:
        m1d.parse_args(flags)
    assert error.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and "\n" not in message and named in message


def test_report_merges_the_finished_configs_with_the_same_settings(sweep, tmp_path):
    """`report --outdir` (a SLURM array's merge step) rebuilds results.json from runs/*/result.json: the same
    numbers as the sweep, leaving out a result run with other settings and naming it."""
    import shutil
    outdir, results = sweep
    merged_dir = tmp_path / "merged"
    shutil.copytree(outdir, merged_dir)
    stray = merged_dir / "runs" / "kl-convex-implicit-seed0" / "result.json"
    record = json.loads(stray.read_text())
    record["identity"]["epochs"] = 99
    stray.write_text(json.dumps(record))
    merged = m1d.main(["report", "--outdir", str(merged_dir)])
    names = [c["name"] for c in merged["configs"]]
    assert names == [name for name in m1d.ALL_CONFIGS if name != "kl-convex-implicit"]
    by_name = {c["name"]: c for c in results["configs"]}
    for c in merged["configs"]:
        assert c["test_mse_forward"] == by_name[c["name"]]["test_mse_forward"]
        assert c["linear_ratio_band"] == by_name[c["name"]]["linear_ratio_band"]
    assert json.loads((merged_dir / "results.json").read_text())["configs"][0]["name"] == names[0]
    with pytest.raises(common.UserError, match="no config.json"):
        m1d.main(["report", "--outdir", str(tmp_path / "empty")])


def test_report_merges_one_at_a_time(sweep, tmp_path, monkeypatch):
    """The tasks of an array end together and each merges: a merge waits for another's lock, so the last to take it
    reads every finished result (a merge that read earlier cannot overwrite the later, complete one)."""
    import fcntl
    import shutil
    import threading
    merged_dir = tmp_path / "merged"
    shutil.copytree(sweep[0], merged_dir)
    (merged_dir / "results.json").unlink()
    read_results = threading.Event()
    aggregate = m1d.aggregate
    monkeypatch.setattr(m1d, "aggregate", lambda per_seed: read_results.set() or aggregate(per_seed))
    with open(merged_dir / ".report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another task's merge in progress
        merge = threading.Thread(target=m1d.main, args=(["report", "--outdir", str(merged_dir)],))
        merge.start()
        assert not read_results.wait(timeout=2)  # without the lock it reads the results in milliseconds
    merge.join(timeout=300)
    assert not merge.is_alive() and len(json.loads((merged_dir / "results.json").read_text())["configs"]) == 8


@pytest.mark.parametrize("process_name", ["gaussian", "convex"])
def test_class_guidance_on_a_noise_interval_reduces_to_cfg_and_to_the_conditional_model(process_name):
    """mnist1d's class guidance takes --guidance-interval: covering every noise level it is plain CFG, covering
    none it is the conditional model (scale 1), and in between it differs from both."""
    torch.manual_seed(0)
    process = common.make_process(process_name, 100, "cosine")
    model = m1d.Denoiser(process, 8).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # zero-initialised layers would make the label irrelevant
            parameter.add_(0.2 * torch.randn_like(parameter))
    draw = lambda *flags: m1d.generate(model, process, m1d.parse_args(["--T", "100", "--samples-per-class", "2",
                                                                        "--sample-steps", "5", *flags]), "cpu", seed=1)[0]
    plain, conditional = draw("--guidance-scale", "4"), draw("--guidance-scale", "1")
    assert torch.equal(draw("--guidance-scale", "4", "--guidance-interval", "0,inf"), plain)
    assert torch.equal(draw("--guidance-scale", "4", "--guidance-interval", "1e9,1e9"), conditional)
    middle = draw("--guidance-scale", "4", "--guidance-interval", "0.5,5")
    assert not torch.equal(middle, plain) and not torch.equal(middle, conditional)
