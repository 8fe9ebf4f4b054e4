"""Unit tests for common.py: every expectation is derived independently (closed forms, NumPy,
torch.distributions, SciPy), never by calling the function under test a second time.

CPU only, small tensors, the whole file runs in a few seconds.

Speed note: on a small, busy machine every OpenMP parallel region can cost ~10 ms of scheduler
latency. PyTorch starts one for transcendental ops and indexing from ~2k elements and for plain
arithmetic from ~32k elements. So per-row tensors (the samplers' (B, 1) coefficients, t indexing)
stay at <= 1000 rows, and large sample counts are spread over columns: every op here is
element-wise, so a (1000, 20) tensor is 20000 independent 1-D samples."""
import json
import math
import os
import pickle
import random
import re
import signal

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import common
from common import (
    EMA, FiLM, UserError, cfg_denoiser, checkpoint_meta, convex_process, cosine_alpha_bar, frechet_distance,
    gaussian_process, linear_beta_schedule, load_checkpoint, load_model_state, make_process, pick_device,
    posterior, q_sample, rng_state, run_main, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_3m,
    sampling_timesteps, save_checkpoint, seed_everything, set_rng_state, timestep_embedding,
)
from mnist1d_semi_implicit import ResBlock1d, UNet1d, load_mnist1d, prior_kl, vlb_terms, vlb_weights

COSINE_S = 0.008  # Nichol & Dhariwal's offset


# ----------------------------------------------------------------------------------------------
# independent references

def np_alpha_bar(T, schedule):
    """alpha_bar_t for t = 0..T (alpha_bar_0 = 1) in NumPy float64, written from the papers."""
    if schedule == "linear":  # Ho et al. 2020: beta_t linear in 1e-4..2e-2 at T = 1000, scaled by 1000 / T
        betas = np.minimum(np.linspace(1e-4, 2e-2, T) * 1000 / T, 0.999)  # (Nichol & Dhariwal 2021)
    else:  # Nichol & Dhariwal 2021, Eq. 17, with betas clipped at 0.999 (diffusers squaredcos_cap_v2)
        f = lambda u: np.cos((u + COSINE_S) / (1 + COSINE_S) * np.pi / 2) ** 2
        u = np.arange(T + 1) / T
        betas = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
    return np.concatenate([[1.0], np.cumprod(1 - betas)])


def np_process(name, T=1000):
    """(a, b) of x_t = a_t x0 + b_t eps as NumPy float64 arrays of length T + 1."""
    if name == "convex":
        s = np.arange(T + 1) / T
        return 1 - s, s
    alpha_bar = np_alpha_bar(T, name.split("-")[1])
    return np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)


def build_process(name, T=1000):
    return convex_process(T) if name == "convex" else gaussian_process(T, name.split("-")[1])


PROCESS_NAMES = ["gaussian-cosine", "gaussian-linear", "convex"]


def bayes_posterior(a_s, b_s, a_t, b_t, x0, x_t):
    """q(x_s | x_t, x0) by the product of the Gaussians q(x_s|x0) = N(a_s x0, b_s^2) (prior) and
    q(x_t|x_s) = N(alpha x_s, sigma2) (likelihood in x_s), alpha = a_t/a_s, sigma2 = b_t^2 - alpha^2 b_s^2.
    Precisions add; the mean is the precision-weighted average of the two pieces of evidence."""
    alpha = a_t / a_s
    sigma2 = b_t**2 - alpha**2 * b_s**2
    precision = 1 / b_s**2 + alpha**2 / sigma2
    var = 1 / precision
    mean = var * (a_s * x0 / b_s**2 + alpha * x_t / sigma2)
    return mean, var


def gaussian_kl(mu_q, var_q, mu_p, var_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) element-wise, the general closed form."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)


def col(values, t, like):
    """values[t] shaped (B, 1, ..., 1), float64, for a (B,) index tensor t."""
    return torch.as_tensor(values, dtype=torch.float64)[t].view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# 1. schedules and processes

def test_linear_beta_schedule_endpoints_length_and_spacing():
    betas = linear_beta_schedule(1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(2e-2, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas.numpy()), (2e-2 - 1e-4) / 999, rtol=1e-9)
    # the betas are given for T = 1000 and scaled by 1000 / T (Nichol & Dhariwal 2021)
    custom = linear_beta_schedule(7000, 0.1, 0.4)
    np.testing.assert_allclose(custom.numpy()[[0, -1]], [0.1 / 7, 0.4 / 7], rtol=1e-12)
    np.testing.assert_allclose(linear_beta_schedule(100).numpy()[[0, -1]], [1e-3, 0.2], rtol=1e-12)
    assert linear_beta_schedule(10).max().item() == 0.999  # 0.2 * 100 clipped


@pytest.mark.parametrize("T", [50, 100, 200, 1000, 4000])
def test_linear_schedule_reaches_the_prior_for_any_T(T):
    """With the betas scaled by 1000 / T, alpha_bar_T = prod(1 - beta) is about e^{-10} whatever T;
    unscaled, T = 100 ended at a_T = 0.60 (sum of betas 1.0), far from N(0, I)."""
    a_T = gaussian_process(T, "linear").a[-1].item()
    assert a_T < 0.01
    assert a_T**2 == pytest.approx(np.prod(1 - np.linspace(1e-4, 2e-2, T) * 1000 / T), rel=1e-9)


def test_process_far_from_the_prior_is_refused_in_one_line():
    # betas of 1e-4..1e-3 over 1000 steps: alpha_bar_T = e^{-0.55}, a_T = 0.76
    with pytest.raises(UserError) as error:
        gaussian_process(1000, "linear", 1e-4, 1e-3)
    message = str(error.value)
    assert "\n" not in message and "prior" in message and "a_T = 0.7" in message
    # the KL used is the closed form for unit-variance data: 0.5 (a^2 + b^2 - 1 - log b^2)
    process = gaussian_process(1000, "cosine")
    a_T, b_T = process.a[-1].item(), process.b[-1].item()
    assert common.prior_kl_per_dim(process) == pytest.approx(-0.5 * math.log(b_T**2), rel=1e-9)
    assert common.prior_kl_per_dim(convex_process(10)) == 0.0
    # it equals prior_kl / dims on data with E[x0^2] = 1 exactly
    x0 = torch.ones(3, 5, dtype=torch.float64)
    assert common.prior_kl_per_dim(process) == pytest.approx(prior_kl(process, x0)[0].item() / 5, rel=1e-9)
    for T in (50, 100, 1000):  # every default process passes
        for name in ("cosine", "linear"):
            assert common.check_prior(gaussian_process(T, name)) is not None


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_closed_form_and_clipping(T):
    alpha_bar = cosine_alpha_bar(T).numpy()  # index i <-> t = i + 1
    assert alpha_bar.shape == (T,)
    t = np.arange(1, T + 1)
    closed = (np.cos(np.pi / 2 * (t / T + COSINE_S) / (1 + COSINE_S)) ** 2
              / np.cos(np.pi / 2 * COSINE_S / (1 + COSINE_S)) ** 2)
    betas = 1 - closed / np.concatenate([[1.0], closed[:-1]])
    unclipped = betas < 0.999
    assert not unclipped[-1] and unclipped[:-1].all()  # only beta_T = 1 is clipped (f(1) = 0)
    np.testing.assert_allclose(alpha_bar[:-1], closed[:-1], rtol=1e-10)
    assert alpha_bar[-1] == pytest.approx(alpha_bar[-2] * (1 - 0.999), rel=1e-10)
    assert (alpha_bar > 0).all() and (alpha_bar <= 1).all()
    assert (np.diff(alpha_bar) < 0).all()  # strictly decreasing
    assert alpha_bar[0] < 1


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("T", [20, 1000])
def test_gaussian_process_is_variance_preserving(schedule, T):
    process = gaussian_process(T, schedule)
    a, b = process.a.numpy(), process.b.numpy()
    assert a.shape == b.shape == (T + 1,) and process.T == T
    assert a[0] == 1 and b[0] == 0
    np.testing.assert_allclose(a**2 + b**2, 1, atol=1e-12)
    np.testing.assert_allclose(a**2, np_alpha_bar(T, schedule), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("T", [1, 8, 1000])
def test_convex_process(T):
    process = convex_process(T)
    a, b = process.a.numpy(), process.b.numpy()
    assert process.T == T and a[0] == 1 and b[0] == 0 and a[-1] == 0 and b[-1] == 1
    np.testing.assert_allclose(a + b, 1, atol=1e-15)
    np.testing.assert_allclose(b, np.arange(T + 1) / T, atol=1e-15)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_snr_strictly_decreasing(name):
    snr = build_process(name).snr().numpy()
    a, b = np_process(name)
    assert np.isinf(snr[0])
    np.testing.assert_allclose(snr[1:], a[1:] ** 2 / b[1:] ** 2, rtol=1e-10, atol=1e-300)
    assert (np.diff(snr[1:]) < 0).all()


def test_make_process_and_unknown_names():
    assert torch.equal(make_process("convex", 10).b, convex_process(10).b)
    assert torch.equal(make_process("gaussian", 10, "linear").a, gaussian_process(10, "linear").a)
    with pytest.raises(UserError, match="schedule"):
        gaussian_process(10, "quadratic")
    with pytest.raises(UserError, match="noise"):
        make_process("uniform", 10)


# ----------------------------------------------------------------------------------------------
# 2. q_sample

@pytest.mark.parametrize("name", ["gaussian-cosine", "convex"])
def test_q_sample_exact_and_empirical_moments(name):
    process, (a, b) = build_process(name), np_process(name)
    gen = torch.Generator().manual_seed(0)
    rows, cols, x0_value = 1000, 20, 0.7
    for t in [0, 1, 250, 500, 999, 1000]:
        x0 = torch.full((rows, cols), x0_value)
        noise = torch.randn(rows, cols, generator=gen)
        x_t = q_sample(process, x0, torch.full((rows,), t), noise)
        assert x_t.shape == x0.shape and x_t.dtype == torch.float32
        torch.testing.assert_close(x_t, (float(a[t]) * x0_value + float(b[t]) * noise.double()).float(), rtol=1e-6, atol=1e-6)
        # moments of x_t | x0: mean a_t x0, variance b_t^2; 5 standard errors with m = 20000 draws
        m = rows * cols
        assert abs(x_t.double().mean().item() - a[t] * x0_value) <= 5 * b[t] / math.sqrt(m) + 1e-6
        assert abs(x_t.double().var().item() - b[t] ** 2) <= 5 * b[t] ** 2 * math.sqrt(2 / (m - 1)) + 1e-12
    # rows with different t in one batch use their own coefficients
    t = torch.tensor([1, 500, 1000])
    x0, noise = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.5], [-1.0], [2.0]])
    expected = [a[i] * x + b[i] * e for i, x, e in zip([1, 500, 1000], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0])]
    np.testing.assert_allclose(q_sample(process, x0, t, noise).flatten().numpy(), expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 3. posterior

def random_pairs(T, n, gen):
    t = torch.randint(2, T + 1, (n,), generator=gen)
    s = (torch.rand(n, generator=gen, dtype=torch.float64) * (t - 1)).long() + 1  # 1 <= s < t
    t[:3], s[:3] = torch.tensor([T, 2, T]), torch.tensor([T - 1, 1, 1])
    return t, s


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_posterior_matches_bayes_rule(name):
    process, (a, b) = build_process(name), np_process(name)
    gen = torch.Generator().manual_seed(1)
    t, s = random_pairs(1000, 64, gen)
    x0 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    mean, var = posterior(process, x0, x_t, t, s)
    ref_mean, ref_var = bayes_posterior(col(a, s, x0), col(b, s, x0), col(a, t, x0), col(b, t, x0), x0, x_t)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(var.expand_as(x0), ref_var.expand_as(x0), rtol=1e-9, atol=1e-14)
    assert (var > 0).all()
    # float32 inputs give the same numbers to float32 accuracy
    mean32, var32 = posterior(process, x0.float(), x_t.float(), t, s)
    assert mean32.dtype == torch.float32
    torch.testing.assert_close(mean32.double(), ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var32.double().expand_as(x0), ref_var.expand_as(x0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_posterior_to_time_zero_is_x0(name):
    process = build_process(name)
    x0, x_t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    mean, var = posterior(process, x0, x_t, torch.tensor([1, 3, 500, 1000]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_ddpm_beta_tilde(schedule):
    """Ho et al. 2020, Eqs. 6-7: q(x_{t-1}|x_t,x0) = N(c0 x0 + ct x_t, beta_tilde_t) with
    beta_tilde_t = (1-abar_{t-1})/(1-abar_t) beta_t, c0 = sqrt(abar_{t-1}) beta_t/(1-abar_t),
    ct = sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t)."""
    T = 1000
    process = gaussian_process(T, schedule)
    abar = np_alpha_bar(T, schedule)
    t = np.arange(1, T + 1)
    beta = 1 - abar[t] / abar[t - 1]
    beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * beta
    c0 = np.sqrt(abar[t - 1]) * beta / (1 - abar[t])
    ct = np.sqrt(1 - beta) * (1 - abar[t - 1]) / (1 - abar[t])
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(T, 1, generator=gen, dtype=torch.float64)
    x_t = torch.randn(T, 1, generator=gen, dtype=torch.float64)
    tt = torch.from_numpy(t)
    mean, var = posterior(process, x0, x_t, tt, tt - 1)
    np.testing.assert_allclose(var.flatten().numpy(), beta_tilde, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(mean.flatten().numpy(), c0 * x0.flatten().numpy() + ct * x_t.flatten().numpy(),
                               rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 4. vlb_terms

def direct_vlb(process, x0, x0_pred, t):
    """L_{t-1} per sample from its definition (float64): KL of the two posteriors for t >= 2,
    -log N(x0; x0_pred, b_1^2) for t = 1."""
    out = []
    for i in range(len(t)):
        ti = t[i:i + 1]
        if ti.item() == 1:
            nll = -Normal(x0_pred[i], process.b[1].item()).log_prob(x0[i]).sum()
            out.append(nll)
        else:
            x_t = torch.zeros_like(x0[i:i + 1])  # the KL does not depend on x_t
            mu_q, var_q = posterior(process, x0[i:i + 1], x_t, ti, ti - 1)
            mu_p, var_p = posterior(process, x0_pred[i:i + 1], x_t, ti, ti - 1)
            out.append(gaussian_kl(mu_q, var_q.expand_as(mu_q), mu_p, var_p.expand_as(mu_p)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_vlb_terms_equal_kl_and_decoder_nll(name):
    process = build_process(name)
    gen = torch.Generator().manual_seed(3)
    n = 24
    t = torch.randint(1, 1001, (n,), generator=gen)
    t[:4] = torch.tensor([1, 2, 1000, 1])  # both kinds of term in one batch, and the edges
    x0 = torch.randn(n, 2, 5, generator=gen, dtype=torch.float64)
    x0_pred = x0 + 0.3 * torch.randn(n, 2, 5, generator=gen, dtype=torch.float64)
    terms = vlb_terms(process, x0, x0_pred, t)
    assert terms.shape == (n,)
    expected = direct_vlb(process, x0, x0_pred, t)
    torch.testing.assert_close(terms, expected, rtol=1e-8, atol=1e-9)
    # the t = 1 decoder term written out by hand too
    b1 = process.b[1].item()
    row = 0
    hand = 0.5 * 10 * math.log(2 * math.pi * b1**2) + ((x0[row] - x0_pred[row]) ** 2).sum().item() / (2 * b1**2)
    assert terms[row].item() == pytest.approx(hand, rel=1e-10)
    # float32 inputs agree with the float64 result to float32 accuracy
    torch.testing.assert_close(vlb_terms(process, x0.float(), x0_pred.float(), t).double(), expected,
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_vlb_weights_are_snr_differences(name):
    a, b = np_process(name)
    snr = a**2 / np.where(b == 0, np.nan, b) ** 2
    weights = vlb_weights(build_process(name)).numpy()
    np.testing.assert_allclose(weights[2:], (snr[1:-1] - snr[2:]) / 2, rtol=1e-9)
    assert weights[1] == pytest.approx(1 / (2 * b[1] ** 2), rel=1e-12)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_vlb_terms_carry_gradient(name):
    process = build_process(name)
    gen = torch.Generator().manual_seed(4)
    t = torch.tensor([1, 2, 37, 500, 1000])
    x0 = torch.randn(5, 1, 6, generator=gen, dtype=torch.float64)
    start = x0 + 0.1 * torch.randn(5, 1, 6, generator=gen, dtype=torch.float64)
    x0_pred = start.clone().requires_grad_(True)
    vlb_terms(process, x0, x0_pred, t).sum().backward()
    grad = x0_pred.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()  # every sample gets a gradient
    reference = start.clone().requires_grad_(True)
    direct_vlb(process, x0, reference, t).sum().backward()
    torch.testing.assert_close(grad, reference.grad, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 5. prior_kl

@pytest.mark.parametrize("name,T", [("gaussian-cosine", 1000), ("gaussian-linear", 1000),
                                    ("unscaled-linear", 10), ("convex", 1000)])
def test_prior_kl_closed_form(name, T):
    if name == "unscaled-linear":  # far from the prior (alpha_bar_T ~ 0.9): built by hand, gaussian_process refuses it
        alpha_bar = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 2e-2, T))])
        a, b = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
        process = common.Process(torch.tensor(a), torch.tensor(b))
    else:
        process, (a, b) = build_process(name, T), np_process(name, T)
    x0 = 3 * torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kl = prior_kl(process, x0)
    assert kl.shape == (6,)
    expected = kl_divergence(Normal(float(a[-1]) * x0, torch.tensor(float(b[-1]), dtype=torch.float64)),
                             Normal(torch.zeros_like(x0), torch.ones_like(x0))).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected, rtol=1e-7, atol=1e-9)
    if name == "convex":
        assert kl.abs().max() < 1e-12  # x_T is pure noise
    if T == 10:
        assert kl.min() > 0.1  # a non-trivial case (alpha_bar_T ~ 0.9)
        with pytest.raises(UserError, match="prior"):
            common.check_prior(process)


# ----------------------------------------------------------------------------------------------
# 6. samplers on a toy Gaussian: x0 ~ N(M, V) in 1-D, exact denoiser E[x0 | x_t]

TOY_M, TOY_V = 1.5, 0.25


def toy_denoiser(process, calls=None):
    a, b = process.a, process.b

    def denoise(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        if calls is not None:
            calls.append(int(t[0]))
        a_t, b_t = a[t].view(-1, 1), b[t].view(-1, 1)
        gain = a_t * TOY_V / (a_t**2 * TOY_V + b_t**2)
        return (TOY_M + gain * (x.double() - a_t * TOY_M)).to(x.dtype)
    return denoise


def exact_output_law(name, sampler, steps, eta, T=1000):
    """Mean and variance of the sampler's output when x_T ~ N(0, b_T^2) and the denoiser is the exact
    (linear) E[x0|x_t]: every update is affine in x plus independent Gaussian noise, so the law is
    propagated exactly in float64 from the papers' update rules (Ho Alg. 2 / Song Eq. 12 / Lu Alg. 2, and its
    SDE form, Lu Sec. 5, for DPM-Solver++ with eta = 1; 'dpmpp3m': the third-order multistep step written as the
    Newton interpolant of the last three x0-predictions, integrated exactly).
    Its distance to (TOY_M, TOY_V) is the sampler's discretisation error, free of sampling noise."""
    a, b = np_process(name, T)
    times = np.round(np.linspace(T, 0, steps + 1)).astype(int)
    gains = {t: a[t] * TOY_V / (a[t] ** 2 * TOY_V + b[t] ** 2) for t in times}
    if sampler in ("ddpm", "ddim"):  # x_s = c D(x_t) + c_x x_t + sigma z, D(x) = k x + d
        eta = 1.0 if sampler == "ddpm" else eta
        mean, var = 0.0, b[T] ** 2
        for t, s in zip(times[:-1], times[1:]):
            k = gains[t]
            d = TOY_M - k * a[t] * TOY_M
            sigma2 = eta**2 * (b[t] ** 2 - (a[t] / a[s]) ** 2 * b[s] ** 2) * b[s] ** 2 / b[t] ** 2
            c_x = math.sqrt(max(b[s] ** 2 - sigma2, 0.0)) / b[t]
            c = a[s] - c_x * a[t]
            mean, var = (c_x + c * k) * mean + c * d, (c_x + c * k) ** 2 * var + (sigma2 if s > 0 else 0.0)
        return mean, var
    # DPM-Solver++(2M) or (3M), eta = 0 (the ODE) or 1 (its SDE form): x and the earlier x0-predictions are
    # affine in independent standard normals u = (x_T / b_T, z_1, ..., z_steps): a vector of their
    # coefficients with the constant term appended
    lam = lambda i: math.log(a[i] / b[i]) if a[i] > 0 else -math.inf
    one = np.eye(steps + 2)[-1]
    x, history = b[T] * np.eye(steps + 2)[0], []
    for j, (t, s) in enumerate(zip(times[:-1], times[1:])):
        k = gains[t]
        D = k * x + (TOY_M - k * a[t] * TOY_M) * one
        if s == 0:
            x = D
            break
        h = lam(s) - lam(t)
        e = b[s] * a[t] / (a[s] * b[t])  # e^{-h}
        if sampler == "dpmpp2m":  # Lu Alg. 2: D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
            r = history[0][1] / h if history else None
            data = D if not history else (1 + 1 / (2 * r)) * D - 1 / (2 * r) * history[0][0]
            data_term = (1 - e ** (1 + eta)) * data
        elif sampler == "dpmpp3m":  # x0 = D + u D' + u^2 D''/2 in lambda, integrated against (1+eta) e^{-(1+eta)(h-u)}
            H = (1 + eta) * h
            moments = [1 - e ** (1 + eta)]  # int_0^h (1+eta) e^{-(1+eta)(h-u)} u^k du / h^k, by parts
            for order in (1, 2):
                moments.append(1 - order / H * moments[-1])
            data_term = moments[0] * D
            if history:  # h D' and h^2 D''/2 by divided differences of the earlier predictions
                points = [0.0] + [-sum(g for _, g in history[:i + 1]) / h for i in range(len(history))]
                values = [D] + [p for p, _ in history]
                first = (values[0] - values[1]) / (points[0] - points[1])
                if len(history) == 1:
                    data_term = data_term + moments[1] * first
                else:
                    second = (first - (values[1] - values[2]) / (points[1] - points[2])) / (points[0] - points[2])
                    slope_here = first + (points[0] - points[1]) * second  # h D' at the current point
                    data_term = data_term + moments[1] * slope_here + moments[2] * second
        else:
            raise ValueError(f"no exact law for sampler {sampler!r}")
        x = b[s] / b[t] * e**eta * x + a[s] * data_term
        x[j + 1] += b[s] * math.sqrt(1 - e ** (2 * eta))  # the step's own noise z_{j+1} (none for eta = 0)
        history = [(D, h)] + history[:1]
    return x[-1], float((x[:-1] ** 2).sum())


# (label, function, steps, options, allowance): the allowance bounds |exact law - target| in variance,
# measured with exact_output_law (cosine / convex): DDPM-1000 0.0020/0.0018, DDPM-100 0.0173/0.0160,
# DDIM-50 0.0153/0.0144, DDIM(eta=1)-1000 = DDPM-1000, DPM++2M-20 0.0015/0.0055, its SDE form at 20 steps
# +0.0159/+0.0256 (DDPM at 20 steps: -0.063), DPM++3M's SDE form at 20 steps +0.0305/+0.0207 (at 40: +0.0037/
# +0.0016). The DDPM and DDIM deficits are the known under-dispersion of the q-posterior variance / first-order
# steps.
SAMPLER_CASES = [
    ("ddpm-1000", sample_ddpm, 1000, {}, 0.005),
    ("ddpm-100", sample_ddpm, 100, {}, 0.02),
    ("ddim-eta0-50", sample_ddim, 50, {"eta": 0.0}, 0.02),
    ("ddim-eta1-1000", sample_ddim, 1000, {"eta": 1.0}, 0.005),
    ("dpmpp2m-20", sample_dpmpp_2m, 20, {}, 0.008),
    ("dpmpp2m-sde-20", sample_dpmpp_2m, 20, {"eta": 1.0}, 0.03),
    ("dpmpp3m-sde-20", sample_dpmpp_3m, 20, {"eta": 1.0}, 0.035),
    ("dpmpp3m-40", sample_dpmpp_3m, 40, {}, 0.006),
]


@pytest.mark.parametrize("name", ["gaussian-cosine", "convex"])
@pytest.mark.parametrize("label,sampler,steps,options,allowance", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_sampler_recovers_toy_gaussian(name, label, sampler, steps, options, allowance):
    process = build_process(name)
    shape = (1000, 20)  # 20000 independent 1-D samples (see the speed note at the top)
    n = shape[0] * shape[1]
    gen = torch.Generator().manual_seed(6)
    x = process.b[-1].item() * torch.randn(shape, generator=gen)
    out = sampler(toy_denoiser(process), x, process, steps, generator=gen, **options)
    assert out.shape == shape and torch.isfinite(out).all()
    mean, var = out.double().mean().item(), out.double().var().item()
    law_mean, law_var = exact_output_law(name, label.split("-")[0], steps, options.get("eta", 0.0))
    # the scheme itself is accurate: discretisation error within the allowance
    assert abs(law_mean - TOY_M) < 1e-3 and abs(law_var - TOY_V) < allowance
    # the samples follow that law: 5 standard errors (se(mean) = sqrt(var/n) ~ 0.0035,
    # se(var) = var sqrt(2/(n-1)) ~ 0.0025 for n = 20000)
    se_mean, se_var = math.sqrt(law_var / n), law_var * math.sqrt(2 / (n - 1))
    assert abs(mean - law_mean) < 5 * se_mean, (mean, law_mean)
    assert abs(var - law_var) < 5 * se_var, (var, law_var)
    # hence the target within sampling error plus discretisation allowance
    assert abs(mean - TOY_M) < 5 * se_mean + 1e-3
    assert abs(var - TOY_V) < 5 * se_var + allowance


# every sampler on the linear schedule at several T (steps None = T): with the betas scaled by 1000 / T
# the output law's distance to the target (measured with exact_output_law: mean <= 0.0046, variance
# deficit <= 0.031, except DDPM with 50 steps at T = 50, 0.053: few large ancestral steps under-disperse;
# SDE-DPM-Solver++ with 20 steps over-disperses by 0.048 at T = 50, by <= 0.014 elsewhere) is within the
# allowance; unscaled, T = 100 started at a_T = 0.60 and the mean was off by ~0.5.
# Not here: DPM-Solver++(3M)'s SDE form, whose second differences of noisy x0-predictions over-disperse on the
# uneven integer grids of a short schedule (variance +0.48 at T = 50 with 20 steps, +1.43 with 40; +0.064 at
# T = 1000 with 20); its ODE form is here.
ANY_T_CASES = [("ddpm", sample_ddpm, None, {}), ("ddim-eta0", sample_ddim, 50, {"eta": 0.0}),
               ("ddim-eta0.5", sample_ddim, None, {"eta": 0.5}), ("dpmpp2m", sample_dpmpp_2m, 20, {}),
               ("dpmpp2m-sde", sample_dpmpp_2m, 20, {"eta": 1.0}), ("dpmpp3m", sample_dpmpp_3m, 20, {})]


@pytest.mark.parametrize("T", [50, 100, 200, 1000])
@pytest.mark.parametrize("label,sampler,steps,options", ANY_T_CASES, ids=[c[0] for c in ANY_T_CASES])
def test_every_sampler_recovers_toy_gaussian_on_the_linear_schedule_at_any_T(T, label, sampler, steps, options):
    process = gaussian_process(T, "linear")
    steps = min(steps or T, T)
    shape = (1000, 20)
    n = shape[0] * shape[1]
    gen = torch.Generator().manual_seed(T)
    x = process.b[-1].item() * torch.randn(shape, generator=gen)
    out = sampler(toy_denoiser(process), x, process, steps, generator=gen, **options)
    mean, var = out.double().mean().item(), out.double().var().item()
    law_mean, law_var = exact_output_law("gaussian-linear", label.split("-")[0], steps, options.get("eta", 0.0), T)
    var_allowance = 0.06 if T == 50 else 0.035
    assert abs(law_mean - TOY_M) < 0.006 and abs(law_var - TOY_V) < var_allowance, (law_mean, law_var)
    # the samples follow that law (5 standard errors), hence recover the target within the allowance
    se_mean, se_var = math.sqrt(law_var / n), law_var * math.sqrt(2 / (n - 1))
    assert abs(mean - law_mean) < 5 * se_mean and abs(var - law_var) < 5 * se_var, (mean, var, law_mean, law_var)
    assert abs(mean - TOY_M) < 5 * se_mean + 0.006 and abs(var - TOY_V) < 5 * se_var + var_allowance


@pytest.mark.parametrize("name", ["gaussian-cosine", "convex"])
@pytest.mark.parametrize("steps", [1000, 37])
def test_ddim_eta1_is_ddpm(name, steps):
    """DDIM with eta = 1 is DDPM step for step; with the same generator both draw the same noise
    (neither draws on the final step to t = 0), so the samples agree path by path."""
    process = build_process(name)
    x = process.b[-1].item() * torch.randn(500, 4, generator=torch.Generator().manual_seed(7))
    ddpm = sample_ddpm(toy_denoiser(process), x, process, steps, generator=torch.Generator().manual_seed(8))
    ddim = sample_ddim(toy_denoiser(process), x, process, steps, generator=torch.Generator().manual_seed(8), eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)
    assert abs(ddim.mean() - ddpm.mean()) < 1e-5 and abs(ddim.var() - ddpm.var()) < 1e-5
    # and it is random: a different seed gives different samples
    other = sample_ddim(toy_denoiser(process), x, process, steps, generator=torch.Generator().manual_seed(9), eta=1.0)
    assert (other - ddim).abs().max() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_3m_data_term_integrates_a_quadratic_exactly(eta):
    """The 3M step's data term is the exact integral of the interpolating quadratic through the last three
    x0-predictions: local error O(h^4), i.e. 16x smaller per halving of h (uneven steps r0 = 0.7, r1 = 1.4).
    x0(u) = e^{k u} has the closed form int_0^h c e^{-c(h-u)} e^{k u} du = c (e^{k h} - e^{-c h}) / (c + k),
    c = 1 + eta.
    Weighting the h^2 D''/2 difference by c2 / 2 instead (k-diffusion's dpmpp_3m_sde) falls only 8x per halving."""
    k, c, r0, r1 = 1.3, 1 + eta, 0.7, 1.4
    errors, halved = [], []
    for h in (0.2, 0.1, 0.05, 0.025):
        predictions = [math.exp(-k * r0 * h * m) for m in (0, 1)] + [math.exp(-k * (r0 + r1) * h)]
        exact = c * (math.exp(k * h) - math.exp(-c * h)) / (c + k)
        errors.append(common.dpmpp_3m_data_term(predictions, [r0 * h, r1 * h], h, eta) - exact)
        H = c * h
        c1 = 1 - (-math.expm1(-H)) / H
        c2 = 1 - 2 * c1 / H
        slopes = [(predictions[0] - predictions[1]) / r0, (predictions[1] - predictions[2]) / r1]
        curvature = (slopes[0] - slopes[1]) / (r0 + r1)
        halved.append(errors[-1] - 0.5 * c2 * curvature)  # the same step with the curvature weighted c2 / 2
    ratios = [earlier / later for earlier, later in zip(errors, errors[1:])]
    assert all(14 < ratio < 17 for ratio in ratios[1:]), ratios
    assert abs(errors[-1]) < 1e-6
    halved_ratios = [earlier / later for earlier, later in zip(halved, halved[1:])]
    assert all(7 < ratio < 9.5 for ratio in halved_ratios[1:]), halved_ratios
    # with one or two predictions the expansion stops earlier: constant, then linear, integrated exactly
    h = 0.3
    assert common.dpmpp_3m_data_term([2.0], [], h, eta) == pytest.approx(2.0 * -math.expm1(-c * h), rel=1e-12)
    line = lambda u: 2.0 + 0.5 * u  # x0 linear in lambda: the two-point step is exact
    exact = 2.0 * -math.expm1(-c * h) + 0.5 * (h - -math.expm1(-c * h) / c)
    assert common.dpmpp_3m_data_term([line(0), line(-0.4)], [0.4], h, eta) == pytest.approx(exact, rel=1e-12)


# (law label, sampler, its SDE form's name in SAMPLERS, law steps, another sampler its SDE form must differ from)
DPMPP_CASES = [("dpmpp2m", sample_dpmpp_2m, "dpmpp-sde", (20, 40, 80, 160), sample_ddpm, 1e-2),
               ("dpmpp3m", sample_dpmpp_3m, "dpmpp-3m-sde", (20, 40, 80), sample_dpmpp_2m, 1e-3)]


@pytest.mark.parametrize("name", ["gaussian-cosine", "convex"])
@pytest.mark.parametrize("label,sampler,registered,law_steps,other,apart", DPMPP_CASES, ids=[c[0] for c in DPMPP_CASES])
def test_dpmpp_follows_its_law_and_its_sde_first_step_is_ddpm(name, label, sampler, registered, law_steps, other,
                                                             apart):
    """The ODE form (eta = 0) is deterministic and affine in x_T on the toy: each sample equals the exact law's
    map of its own x_T (path by path). The SDE form's first-order step is DDPM's posterior step (Lu et al. 2022,
    Sec. 5): with 2 steps (one first-order step, then x0_hat at the final step) both draw the same noise and
    agree path by path; registered in SAMPLERS it is that sampler; with 20 steps it differs from `other`
    (2M: the correction makes it differ from DDPM; 3M: from 2M). Its exact law converges: the variance error
    falls with the steps (2M SDE 0.016 / 0.026 at 20 steps, 0.0014 / 0.0012 at 160 for cosine / convex, where
    a wrong 2M coefficient stalls near -0.005; 3M SDE 0.031 / 0.021 at 20, < 0.002 at 80)."""
    process = build_process(name)
    x = process.b[-1].item() * torch.randn(500, 4, generator=torch.Generator().manual_seed(7))
    run = lambda sampler, steps, **options: sampler(toy_denoiser(process), x.double(), process, steps,
                                                    generator=torch.Generator().manual_seed(8), **options)
    for steps in (3, 20):
        law_mean, law_var = exact_output_law(name, label, steps, 0.0)
        slope = math.sqrt(law_var) / process.b[-1].item()  # output = law_mean + slope * x_T for the ODE
        torch.testing.assert_close(run(sampler, steps), law_mean + slope * x.double(), rtol=0, atol=1e-9)
    torch.testing.assert_close(run(sampler, 2, eta=1.0), run(sample_ddpm, 2), rtol=0, atol=1e-9)
    assert torch.equal(run(common.SAMPLERS[registered], 20), run(sampler, 20, eta=1.0))
    other_options = {"eta": 1.0} if other is sample_dpmpp_2m else {}
    assert (run(sampler, 20, eta=1.0) - run(other, 20, **other_options)).abs().max() > apart
    errors = [exact_output_law(name, label, steps, 1.0)[1] - TOY_V for steps in law_steps]
    assert all(abs(later) < abs(earlier) for earlier, later in zip(errors, errors[1:])) and abs(errors[-1]) < 0.002


def test_ddim_eta0_and_dpmpp_are_deterministic():
    process = gaussian_process(100)
    x = process.b[-1].item() * torch.randn(50, 1, generator=torch.Generator().manual_seed(10))
    for sampler in (sample_ddim, sample_dpmpp_2m):
        one = sampler(toy_denoiser(process), x, process, 10, generator=torch.Generator().manual_seed(1))
        two = sampler(toy_denoiser(process), x, process, 10, generator=torch.Generator().manual_seed(2))
        assert torch.equal(one, two)


# every generator/tensor device pair: a generator draws only on its own device (CUDA raises "Expected a
# 'cuda' device type for generator" otherwise). CI has no GPU, so a strict torch.randn stands in for that
# check, and the tensors live on the 'meta' device (shapes only): the noise must be drawn on the
# generator's device and moved to the tensors'.
DEVICE_CASES = [("ddpm", sample_ddpm, {}), ("ddim-eta1", sample_ddim, {"eta": 1.0}), ("ddim-eta0", sample_ddim, {}),
                ("dpmpp2m", sample_dpmpp_2m, {}), ("dpmpp2m-sde", sample_dpmpp_2m, {"eta": 1.0}),
                ("dpmpp3m", sample_dpmpp_3m, {}), ("dpmpp3m-sde", sample_dpmpp_3m, {"eta": 1.0})]


@pytest.mark.parametrize("label,sampler,options", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
@pytest.mark.parametrize("tensor_device", ["cpu", "meta"])
@pytest.mark.parametrize("with_generator", [True, False])
def test_samplers_work_with_any_generator_and_tensor_device(monkeypatch, label, sampler, options, tensor_device,
                                                            with_generator):
    real_randn, draws = torch.randn, []

    def strict_randn(*args, generator=None, device=None, **kwargs):
        device = torch.device(device or "cpu")
        if generator is not None and generator.device.type != device.type:
            raise RuntimeError(f"Expected a '{device.type}' device type for generator but found '{generator.device.type}'")
        draws.append(device.type)
        return real_randn(*args, generator=generator, device=device, **kwargs)
    monkeypatch.setattr(torch, "randn", strict_randn)
    process = gaussian_process(50)
    generator = torch.Generator().manual_seed(0) if with_generator else None
    x = torch.ones(4, 3, device=tensor_device)
    out = sampler(lambda x, t: 0.5 * x, x, process, 10, generator=generator, **options)
    assert out.device.type == tensor_device and out.shape == (4, 3)
    stochastic = label in ("ddpm", "ddim-eta1", "dpmpp2m-sde", "dpmpp3m-sde")
    assert len(draws) == (9 if stochastic else 0)  # one draw per step, none on the final step to t = 0
    if with_generator:
        assert set(draws) <= {"cpu"}
    if tensor_device == "cpu" and with_generator:  # the same generator seed gives the same samples
        again = sampler(lambda x, t: 0.5 * x, x, process, 10, generator=torch.Generator().manual_seed(0), **options)
        assert torch.equal(out, again)


# ----------------------------------------------------------------------------------------------
# 7. the final step returns x0_hat, no noise added

FINAL_CASES = [("ddpm", sample_ddpm, {}), ("ddim-eta0", sample_ddim, {"eta": 0.0}),
               ("ddim-eta1", sample_ddim, {"eta": 1.0}), ("dpmpp2m", sample_dpmpp_2m, {}),
               ("dpmpp2m-sde", sample_dpmpp_2m, {"eta": 1.0}), ("dpmpp3m-sde", sample_dpmpp_3m, {"eta": 1.0})]


@pytest.mark.parametrize("name", ["gaussian-cosine", "convex"])
@pytest.mark.parametrize("label,sampler,options", FINAL_CASES, ids=[c[0] for c in FINAL_CASES])
@pytest.mark.parametrize("steps", [1, 7, 100])
def test_sampler_final_step_returns_denoiser_output(name, label, sampler, options, steps):
    T = 100
    process = build_process(name, T)
    last = round(T / steps)  # the last evaluated time: the grid T, ..., T/steps, 0
    marker = torch.tensor(0.8125)  # exactly representable
    calls = []

    def denoise(x, t):
        calls.append(int(t[0]))
        if int(t[0]) == last:
            return torch.full_like(x, marker.item())
        return 0.5 * x - 0.25
    x = process.b[-1].item() * torch.randn(6, 3, generator=torch.Generator().manual_seed(11))
    outs = []
    for seed in (0, 1):
        calls.clear()
        outs.append(sampler(denoise, x, process, steps, generator=torch.Generator().manual_seed(seed), **options))
        assert len(calls) == steps and calls[0] == T and calls[-1] == last
    for out in outs:
        assert torch.equal(out, torch.full_like(x, marker.item()))


# ----------------------------------------------------------------------------------------------
# 8. classifier-free guidance

def toy_model_fn(counter):
    def model_fn(x, t, cond):
        counter.append(x.shape[0])
        return torch.tanh(x * cond) + 0.01 * t[:, None].float() * cond**2
    return model_fn


def test_cfg_denoiser_scale_one_is_conditional():
    gen = torch.Generator().manual_seed(12)
    x, cond, null = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.zeros(4, 3)
    t = torch.tensor([1, 5, 9, 100])
    counter = []
    out = cfg_denoiser(toy_model_fn(counter), cond, null, 1.0)(x, t)
    assert counter == [4]  # one conditional pass only
    expected = torch.tanh(x * cond) + 0.01 * t[:, None].float() * cond**2
    assert torch.equal(out, expected)


@pytest.mark.parametrize("w", [0.0, 2.0, 7.5])
def test_cfg_denoiser_guidance_formula(w):
    gen = torch.Generator().manual_seed(13)
    x, cond, null = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), -0.5 * torch.ones(4, 3)
    t = torch.tensor([1, 5, 9, 100])
    counter = []
    out = cfg_denoiser(toy_model_fn(counter), cond, null, w)(x, t)
    assert counter == [8]  # one batched pass over [cond; null]
    c = torch.tanh(x * cond) + 0.01 * t[:, None].float() * cond**2
    u = torch.tanh(x * null) + 0.01 * t[:, None].float() * null**2
    torch.testing.assert_close(out, u + w * (c - u), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, (1 - w) * u + w * c, rtol=1e-5, atol=1e-5)
    if w == 0.0:
        torch.testing.assert_close(out, u, rtol=0, atol=0)

def test_guidance_interval_covering_everything_is_cfg_and_an_empty_one_is_the_conditional_model():
    process = gaussian_process(100)
    gen = torch.Generator().manual_seed(14)
    x, cond, null = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), -0.5 * torch.ones(4, 3)
    t = torch.tensor([1, 20, 60, 100])
    counter = []
    plain = cfg_denoiser(toy_model_fn(counter), cond, null, 3.0)(x, t)
    everywhere = cfg_denoiser(toy_model_fn(counter), cond, null, 3.0, common.guidance_interval(process, 0, math.inf))(x, t)
    assert torch.equal(everywhere, plain) and counter == [8, 8]
    counter.clear()
    nowhere = cfg_denoiser(toy_model_fn(counter), cond, null, 3.0, common.guidance_interval(process, 1e9, 1e9))(x, t)
    assert torch.equal(nowhere, cfg_denoiser(toy_model_fn([]), cond, null, 1.0)(x, t)) and counter == [4]  # one pass


def test_guidance_interval_selects_the_noise_levels_sigma_b_over_a():
    process = gaussian_process(100)
    a, b = np_process("gaussian-cosine", 100)
    sigma = b / a
    low, high = 0.5, 3.0
    guided = common.guidance_interval(process, low, high)
    t = torch.arange(101)
    assert guided(t).tolist() == [bool(low <= s <= high) for s in sigma]
    assert 0 < guided(t).sum() < 100
    # in a batch of mixed noise levels: guided rows are CFG, the others the conditional model
    gen = torch.Generator().manual_seed(15)
    x, cond, null = torch.randn(101, 3, generator=gen), torch.randn(101, 3, generator=gen), torch.zeros(101, 3)
    out = cfg_denoiser(toy_model_fn([]), cond, null, 2.0, guided)(x, t)
    inside = guided(t)
    assert torch.equal(out[inside], cfg_denoiser(toy_model_fn([]), cond, null, 2.0)(x, t)[inside])
    assert torch.equal(out[~inside], cfg_denoiser(toy_model_fn([]), cond, null, 1.0)(x, t)[~inside])


def test_projected_guidance_reduces_to_cfg_and_removes_the_parallel_part():
    gen = torch.Generator().manual_seed(16)
    cond, uncond = torch.randn(5, 1, 4, 4, generator=gen), torch.randn(5, 1, 4, 4, generator=gen)
    w = 3.0
    # parallel weight 1, no norm threshold: plain CFG
    torch.testing.assert_close(common.projected_guidance(cond, uncond, w, 1.0, math.inf), uncond + w * (cond - uncond))
    # parallel weight 0: the update is orthogonal to the conditional prediction, per sample ...
    update = common.projected_guidance(cond, uncond, w, 0.0) - cond
    torch.testing.assert_close((update * cond).sum((1, 2, 3)), torch.zeros(5), rtol=0, atol=1e-5)
    # ... and the orthogonal part is CFG's update minus its projection on cond
    diff = cond - uncond
    along = (diff * cond).sum((1, 2, 3), keepdim=True) / (cond * cond).sum((1, 2, 3), keepdim=True) * cond
    torch.testing.assert_close(update, (w - 1) * (diff - along))
    # an uncond that only rescales cond gives a purely parallel update: nothing is left of it
    torch.testing.assert_close(common.projected_guidance(cond, 0.5 * cond, w, 0.0), cond)
    # the norm threshold caps the per-sample update at (w - 1) r and leaves small updates alone
    capped = common.projected_guidance(cond, uncond, w, 1.0, 0.1) - cond
    torch.testing.assert_close(capped.flatten(1).norm(dim=1), torch.full((5,), (w - 1) * 0.1))
    torch.testing.assert_close(common.projected_guidance(cond, uncond, w, 1.0, 1e6), uncond + w * diff)


def test_cfg_denoiser_with_projection():
    gen = torch.Generator().manual_seed(17)
    x, cond, null = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), -0.5 * torch.ones(4, 3)
    t = torch.tensor([1, 5, 9, 100])
    counter = []
    plain = cfg_denoiser(toy_model_fn(counter), cond, null, 2.5)(x, t)
    torch.testing.assert_close(cfg_denoiser(toy_model_fn(counter), cond, null, 2.5, projection=(1.0, math.inf))(x, t), plain)
    assert counter == [8, 8]
    c = toy_model_fn([])(x, t, cond)
    projected = cfg_denoiser(toy_model_fn([]), cond, null, 2.5, projection=(0.0, math.inf))(x, t)
    torch.testing.assert_close(((projected - c) * c).sum(1), torch.zeros(4), rtol=0, atol=1e-5)
    assert not torch.allclose(projected, plain)
    assert torch.equal(cfg_denoiser(toy_model_fn([]), cond, null, 1.0, projection=(0.0, 1.0))(x, t), c)  # w = 1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_interval_guided_sampling_of_a_gaussian_toy_lies_between_cfg_and_the_conditional_law(sampler):
    """Class-conditional Gaussians x0 | c ~ N(c, s^2), c = +-1, with an exact denoiser (cond 0: the mixture's
    posterior mean). Guidance on no step samples the conditional law, exactly as the conditional model does; on
    every step, as plain CFG; on the high-noise steps only, a law whose mean CFG pulls less far."""
    process, s2, w, steps = gaussian_process(1000), 0.25, 4.0, 20

    def model_fn(x, t, cond):
        a, b = process.a[t].float()[:, None], process.b[t].float()[:, None]
        var = a**2 * s2 + b**2  # variance of x_t given c

        def mean_given(mu):
            return mu + a * s2 / var * (x - a * mu)
        weight = torch.sigmoid(2 * a * x / var)  # p(c = +1 | x_t) for the mixture of N(a, var) and N(-a, var)
        mixture = weight * mean_given(1.0) + (1 - weight) * mean_given(-1.0)
        return torch.where(cond == 0, mixture, mean_given(cond))

    n = 4000
    cond, null = torch.ones(n, 1), torch.zeros(n, 1)
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(3)) * process.b[-1].float()

    def draw(guided, scale):
        denoise = cfg_denoiser(model_fn, cond, null, scale, guided)
        return common.SAMPLERS[sampler](denoise, x_T.clone(), process, steps, generator=torch.Generator().manual_seed(4))

    conditional, plain = draw(None, 1.0), draw(None, w)
    assert torch.equal(draw(common.guidance_interval(process, 1e9, 1e9), w), conditional)
    assert torch.equal(draw(common.guidance_interval(process, 0, math.inf), w), plain)
    high_noise = draw(common.guidance_interval(process, 1.0, math.inf), w)
    assert abs(conditional.mean() - 1) < 0.05  # the conditional law (its variance is the sampler's, at 20 steps)
    assert conditional.mean() < high_noise.mean() < plain.mean()


CFG_CASES = [("ddpm-200", sample_ddpm, 200, {}), ("ddim-eta0-50", sample_ddim, 50, {}),
             ("ddim-eta1-200", sample_ddim, 200, {"eta": 1.0}), ("dpmpp2m-20", sample_dpmpp_2m, 20, {}),
             ("dpmpp2m-sde-20", sample_dpmpp_2m, 20, {"eta": 1.0}),
             ("dpmpp3m-sde-20", sample_dpmpp_3m, 20, {"eta": 1.0})]


@pytest.mark.parametrize("label,sampler,steps,options", CFG_CASES, ids=[c[0] for c in CFG_CASES])
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_cfg_denoiser_guides_every_sampler_to_the_guided_gaussian(label, sampler, steps, options, w):
    """A toy conditional model: x0 | cond ~ N(cond, V) and x0 | null ~ N(null, V), each with its exact
    posterior mean, which is affine in the mean m: E[x0|x_t] = m (1 - g a_t) + g x_t, g = a_t V / (a_t^2 V + b_t^2).
    So the guided denoiser uncond + w (cond - uncond) is exactly the posterior mean of N(null + w (cond - null), V),
    and every sampler must return samples of that mean and (within its discretisation allowance) variance.
    Swapping cond and null, or using the wrong formula, moves the mean by (w - 1) or more."""
    process = gaussian_process(1000)
    a, b = process.a, process.b
    cond_mean, null_mean = 1.0, -0.5
    shape = (1000, 10)
    cond, null = torch.full(shape, cond_mean), torch.full(shape, null_mean)
    passes = []

    def model_fn(x, t, c):  # the exact posterior mean for x0 ~ N(c, TOY_V), c broadcast per element
        passes.append(x.shape[0])
        a_t, b_t = a[t].view(-1, 1), b[t].view(-1, 1)
        gain = a_t * TOY_V / (a_t**2 * TOY_V + b_t**2)
        return (c.double() * (1 - gain * a_t) + gain * x.double()).float()
    gen = torch.Generator().manual_seed(15)
    x = b[-1].item() * torch.randn(shape, generator=gen)
    out = sampler(cfg_denoiser(model_fn, cond, null, w), x, process, steps, generator=gen, **options).double()
    assert set(passes) == {shape[0] if w == 1.0 else 2 * shape[0]} and len(passes) == steps
    target_mean = null_mean + w * (cond_mean - null_mean)
    n = out.numel()
    assert abs(out.mean().item() - target_mean) < 5 * math.sqrt(TOY_V / n) + 2e-3
    assert abs(out.var().item() - TOY_V) < 5 * TOY_V * math.sqrt(2 / n) + 0.02


# ----------------------------------------------------------------------------------------------
# 9. building blocks

def test_timestep_embedding_values():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :8], torch.ones(8)) and torch.equal(emb[0, 8:], torch.zeros(8))
    freqs = 10000.0 ** (-np.arange(8) / 8)
    angles = t.numpy()[:, None].astype(np.float64) * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=2e-4)


def test_film_identity_at_init_and_modulation():
    gen = torch.Generator().manual_seed(15)
    film = FiLM(5, 8, nn.GroupNorm(2, 8))
    x, cond = 3 * torch.randn(3, 8, 10, generator=gen) + 1, torch.randn(3, 5, generator=gen)
    groups = x.view(3, 2, 40)
    normed = ((groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True)
                                                                     + 1e-5)).view(3, 8, 10)
    torch.testing.assert_close(film(x, cond), normed, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        film.proj.weight.copy_(torch.randn(16, 5, generator=gen))
        film.proj.bias.copy_(torch.randn(16, generator=gen))
    projected = cond @ film.proj.weight.T + film.proj.bias
    gamma, beta = projected[:, :8, None], projected[:, 8:, None]
    torch.testing.assert_close(film(x, cond), (1 + gamma) * normed + beta, rtol=1e-5, atol=1e-5)


def test_resblock_computes_its_documented_formula_in_1d_and_2d():
    """out = conv2(SiLU(FiLM(conv1(SiLU(GroupNorm(x))), emb))) + skip(x), written out with functional ops; the
    2-D block with the 1-D kernels in its middle row is the 1-D block on a one-row image (one block, two dims)."""
    torch.manual_seed(3)
    block = ResBlock1d(8, 16, emb_dim=12)
    nn.init.normal_(block.film.proj.weight)  # FiLM starts at zero; make the embedding matter
    x, emb = torch.randn(2, 8, 20), torch.randn(2, 12)
    h = F.conv1d(F.silu(F.group_norm(x, 8, block.norm1.weight, block.norm1.bias)), block.conv1.weight, block.conv1.bias, padding=1)
    gamma, beta = (emb @ block.film.proj.weight.T + block.film.proj.bias)[:, :, None].chunk(2, dim=1)
    h = F.silu((1 + gamma) * F.group_norm(h, 8, block.film.norm.weight, block.film.norm.bias) + beta)
    expected = F.conv1d(h, block.conv2.weight, block.conv2.bias, padding=1) + F.conv1d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(block(x, emb), block(x, torch.randn(2, 12)))  # the embedding conditions the output
    assert isinstance(ResBlock1d(16, 16, emb_dim=12).skip, nn.Identity)  # same width: identity skip

    block2d = common.ResBlock(8, 16, emb_dim=12, dims=2)
    with torch.no_grad():
        for name, module in block.named_modules():
            target = block2d.get_submodule(name) if name else block2d
            if isinstance(module, nn.Conv1d):
                target.weight.zero_()
                target.weight[:, :, target.weight.shape[2] // 2] = module.weight  # middle row of the 2-D kernel
                target.bias.copy_(module.bias)
            elif isinstance(module, (nn.GroupNorm, nn.Linear)):
                target.load_state_dict(module.state_dict())
    torch.testing.assert_close(block2d(x[:, :, None, :], emb)[:, :, 0], block(x, emb), rtol=1e-5, atol=1e-5)


def test_unet1d_shape_and_conditioning():
    """Only two forward passes and one backward (each conv / GroupNorm is a parallel region):
    the batch holds x twice, with two different embeddings."""
    torch.manual_seed(16)
    net = UNet1d(1, 1, channels=(8, 16, 16), emb_dim=16)
    x = torch.randn(2, 1, 40)
    emb = timestep_embedding(torch.tensor([10, 999]), 16)
    x_twice = torch.cat([x, x])
    out = net(x_twice, torch.cat([emb, torch.randn(2, 16)]))
    assert out.shape == x_twice.shape == (4, 1, 40)
    films = [m for m in net.modules() if isinstance(m, FiLM)]
    assert len(films) == 3 + 1 + 3
    # FiLM projections start at zero: the embedding has no effect yet
    torch.testing.assert_close(out[:2], out[2:], rtol=0, atol=1e-6)
    # but the gradient reaches every FiLM projection, so training can learn the conditioning
    out.pow(2).mean().backward()
    for film in films:
        assert film.proj.weight.grad is not None and film.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for film in films:
            film.proj.weight.normal_(0, 0.1)
        other = emb.clone()
        other[0] = timestep_embedding(torch.tensor([250]), 16)[0]  # row 1 keeps its embedding
        both = net(x_twice, torch.cat([emb, other]))
        base, changed = both[:2], both[2:]
    assert (changed[0] - base[0]).abs().max() > 1e-3  # the embedding now conditions the output
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=1e-6)  # and only for its own sample


# ----------------------------------------------------------------------------------------------
# 10. EMA

def test_ema_warmup_decay_and_buffers():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.999)
    assert all(not p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    initial = [p.detach().clone() for p in model.parameters()]

    def set_new_weights(offset):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) + offset)
        return [p.detach().clone() for p in model.parameters()]

    new = set_new_weights(1.0)
    assert all(torch.equal(e, i) for e, i in zip(ema.model.parameters(), initial))  # an independent copy
    with torch.no_grad():
        model[1].running_mean.copy_(torch.arange(4.0))
    ema.update(model)  # step 0: decay (1 + 0) / (10 + 0) = 0.1, so 0.9 of the new weights
    for e, i, n in zip(ema.model.parameters(), initial, new):
        torch.testing.assert_close(e, 0.1 * i + 0.9 * n, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, torch.arange(4.0))  # buffers are copied
    previous = [e.clone() for e in ema.model.parameters()]
    new = set_new_weights(-2.0)
    ema.update(model)  # step 1: decay 2 / 11
    for e, p, n in zip(ema.model.parameters(), previous, new):
        torch.testing.assert_close(e, 2 / 11 * p + 9 / 11 * n, rtol=1e-6, atol=1e-6)
    assert ema.steps == 2
    ema.steps = 9000  # (1 + 9000) / (10 + 9000) > 0.999: the cap applies
    previous = [e.clone() for e in ema.model.parameters()]
    new = set_new_weights(5.0)
    ema.update(model)
    for e, p, n in zip(ema.model.parameters(), previous, new):
        torch.testing.assert_close(e, 0.999 * p + 0.001 * n, rtol=1e-6, atol=1e-6)


def test_ema_state_dict_round_trip(tmp_path):
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update(model)
    fresh = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), decay=0.5)
    path = tmp_path / "ema.pt"
    save_checkpoint(str(path), {"ema": ema.state_dict(), "meta": checkpoint_meta("test", "ema")})
    fresh.load_state_dict(load_checkpoint(str(path))["ema"])
    assert fresh.steps == 3 and fresh.decay == 0.99
    for a, b in zip(fresh.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# 11. Fréchet distance

def test_frechet_identical_sets_is_zero():
    features = np.random.default_rng(19).standard_normal((500, 6)) @ np.random.default_rng(20).standard_normal((6, 6))
    assert abs(frechet_distance(features, features)) < 1e-6
    assert abs(frechet_distance(torch.from_numpy(features).float(), features.astype(np.float32))) < 1e-4


def test_frechet_two_gaussians_closed_form():
    rng = np.random.default_rng(21)
    n = 20000
    mu1, mu2 = np.array([1.0, 0.0, -0.5]), np.array([0.0, 0.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    a = mu1 + np.sqrt(s1) * rng.standard_normal((n, 3))
    b = mu2 + np.sqrt(s2) * rng.standard_normal((n, 3))
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # = 4.25
    # the estimate's standard deviation is ~0.04 at n = 20000 (dominated by the mean term,
    # 2 sqrt(sum (mu1-mu2)^2 (s1+s2) / n) ~ 0.035): 5 standard deviations
    assert abs(frechet_distance(a, b) - exact) < 0.2
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_matches_scipy_sqrtm_on_correlated_features():
    """Non-diagonal, non-commuting covariances: same empirical moments, trace of sqrtm(S_a S_b) by SciPy."""
    rng = np.random.default_rng(22)
    a = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 4)) + 1.0
    b = rng.standard_normal((400, 4)) @ rng.standard_normal((4, 4))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    # one-dimensional features: (mu_a - mu_b)^2 + (sd_a - sd_b)^2
    x, y = rng.normal(0, 1, 1000), rng.normal(2, 3, 1000)
    one_d = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x[:, None], y[:, None]) == pytest.approx(one_d, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# 12. checkpoints and RNG state

def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def good_state(value=1.0):
    return {
        "model": {"weight": torch.full((3, 4), value), "nested": {"bias": torch.arange(5), "scale": 0.5}},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "step": 7, "config": {"lr": 1e-3, "name": "x", "channels": [8, 16], "flag": None},
        "rng": rng_state(),
        "meta": checkpoint_meta("train.py", "unet", note="hello"),
    }


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "sub" / "dir" / "ckpt.pt"  # the directory is created
    state = good_state()
    save_checkpoint(str(path), state)
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temporary file left behind
    loaded = load_checkpoint(str(path), script="train.py", kinds={"unet", "mlp"})
    assert_same(loaded, state)
    assert loaded["meta"] == {"script": "train.py", "kind": "unet", "format_version": 1, "note": "hello"}
    save_checkpoint(str(path), good_state(2.0))  # overwriting replaces it
    assert torch.equal(load_checkpoint(str(path))["model"]["weight"], torch.full((3, 4), 2.0))
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_load_checkpoint_garbage_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(garbage))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(empty))
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), good_state())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt") as info:
        load_checkpoint(str(truncated))
    assert "\n" not in str(info.value)  # one line


def test_load_checkpoint_metadata_checks(tmp_path):
    no_meta = tmp_path / "no_meta.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, no_meta)
    with pytest.raises(UserError, match="metadata"):
        load_checkpoint(str(no_meta))
    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(UserError, match="metadata"):
        load_checkpoint(str(not_a_dict))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), good_state())
    with pytest.raises(UserError, match="'unet'.*expected"):
        load_checkpoint(str(path), kinds={"mlp", "conv"})
    with pytest.raises(UserError, match="written by train.py"):
        load_checkpoint(str(path), script="other.py")
    old = tmp_path / "old.pt"
    state = good_state()
    state["meta"]["format_version"] = 0
    save_checkpoint(str(old), state)
    with pytest.raises(UserError, match="format"):
        load_checkpoint(str(old))


_UNPICKLED = []


def _record_unpickle():
    _UNPICKLED.append(True)
    return "pwned"


class _Payload:
    def __reduce__(self):
        return (_record_unpickle, ())


def test_load_checkpoint_refuses_arbitrary_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(), "meta": checkpoint_meta("train.py", "unet")}, path)
    _UNPICKLED.clear()
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(path))
    assert _UNPICKLED == []  # weights_only: the payload was never executed


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), good_state())
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"f": lambda: 1, "big": torch.zeros(1000), "meta": checkpoint_meta("a", "b")})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp-* file remains
    assert_same(load_checkpoint(str(path))["model"], good_state()["model"])


def test_save_checkpoint_removes_stale_temporaries_of_killed_writers(tmp_path):
    """A kill during torch.save leaves .tmp-*.pt (often 0 bytes). The next save in that directory removes
    those of dead processes on this host and any older than STALE_TEMPORARY_S; a live writer's stays."""
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    host = common._host()
    killed = tmp_path / f".tmp-{host}-{dead_pid}-abc123.pt"
    live = tmp_path / f".tmp-{host}-{os.getpid()}-def456.pt"
    old_style = tmp_path / ".tmp-k3j4h5.pt"  # the naming before host and pid were recorded
    other_host_recent = tmp_path / f".tmp-otherhost-{dead_pid}-ghi789.pt"
    for path in (killed, live, old_style, other_host_recent):
        path.write_bytes(b"")
    hour_ago = os.path.getmtime(old_style) - common.STALE_TEMPORARY_S - 10
    os.utime(old_style, (hour_ago, hour_ago))
    save_checkpoint(str(tmp_path / "ckpt.pt"), good_state())
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", live.name, other_host_recent.name])
    assert_same(load_checkpoint(str(tmp_path / "ckpt.pt"))["model"], good_state()["model"])


def draw_all():
    return random.random(), np.random.rand(), np.random.randn(3).tolist(), torch.rand(4)


def test_rng_state_restores_every_stream():
    seed_everything(123)
    np.random.randn()  # leave a cached Gaussian in numpy's legacy state (has_gauss = 1)
    state = rng_state()
    first = draw_all()
    draw_all()
    set_rng_state(state)
    second = draw_all()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
    seed_everything(123)
    a = draw_all()
    seed_everything(123)
    b = draw_all()
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    seed_everything(124)
    assert draw_all()[0] != a[0]


def test_rng_state_survives_weights_only_checkpoint(tmp_path):
    seed_everything(7)
    np.random.randn()
    path = tmp_path / "rng.pt"
    save_checkpoint(str(path), {"rng": rng_state(), "meta": checkpoint_meta("s", "k")})
    first = draw_all()
    seed_everything(99)  # scramble
    set_rng_state(load_checkpoint(str(path))["rng"])
    second = draw_all()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


def test_load_model_state_mismatch_is_user_error():
    model = nn.Linear(3, 4)
    load_model_state(model, nn.Linear(3, 4).state_dict(), "x.pt")
    with pytest.raises(UserError, match="does not fit") as info:
        load_model_state(model, nn.Linear(5, 4).state_dict(), "x.pt")
    assert "\n" not in str(info.value)


def test_finite_loss_returns_the_value_or_stops_naming_the_kept_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    assert common.finite_loss(torch.tensor(0.25), "step 3", path) == 0.25
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"at step 3; stopped \(last good checkpoint: none\)"):
            common.finite_loss(torch.tensor(bad), "step 3", path)
    common.save_checkpoint(path, {"step": 2})
    with pytest.raises(UserError, match="last good checkpoint: " + re.escape(path)) as info:
        common.finite_loss(torch.tensor(float("nan")), "step 3", path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# 13-14. run_main, pick_device

def test_run_main_user_error_exits_2_with_one_line(capsys):
    def main():
        raise UserError("checkpoint runs/x.pt does not exist")
    with pytest.raises(SystemExit) as info:
        run_main(main)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["error: checkpoint runs/x.pt does not exist"]
    assert captured.out == ""


def test_run_main_success_returns_normally():
    calls = []
    run_main(lambda: calls.append(1))
    assert calls == [1]


def test_pick_device_cpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="not a torch device"):
        pick_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_pick_device_cuda_unavailable():
    assert pick_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device(name)


# ----------------------------------------------------------------------------------------------
# 15. MNIST1D

def test_load_mnist1d_shapes_cache_and_global_rng(tmp_path, monkeypatch):
    def reference_draws():
        random.seed(2024)
        np.random.seed(2024)
        return random.random(), np.random.rand()
    expected = reference_draws()

    random.seed(2024)
    np.random.seed(2024)
    data = load_mnist1d(str(tmp_path))  # generates: mnist1d reseeds the globals internally
    assert (random.random(), np.random.rand()) == expected  # ... and they were restored
    assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
    assert data["y"].shape == (4000,) and data["y_test"].shape == (1000,)
    assert data["x"].dtype == torch.float32 and data["y"].dtype == torch.long
    for labels in (data["y"], data["y_test"]):
        assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    assert torch.isfinite(data["x"]).all() and abs(data["x"].mean()) < 0.1

    cache = tmp_path / "mnist1d_seed42.pkl"
    assert cache.is_file() and not (tmp_path / "mnist1d_seed42.pkl.tmp").exists()
    with open(cache, "rb") as file:
        cached = pickle.load(file)
    np.testing.assert_array_equal(np.asarray(cached["x"], dtype=np.float32), data["x"].numpy())

    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: pytest.fail("regenerated"))
    random.seed(2024)
    np.random.seed(2024)
    again = load_mnist1d(str(tmp_path))  # from the cache
    assert (random.random(), np.random.rand()) == expected
    for key in ("x", "y", "x_test", "y_test"):
        assert torch.equal(again[key], data[key])


def test_load_mnist1d_unwritable_dir_is_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="data-dir"):
        load_mnist1d(str(blocker / "data"))


# ----------------------------------------------------------------------------------------------
# 16. sampling_timesteps

@pytest.mark.parametrize("T,steps", [(1000, 1000), (1000, 999), (1000, 50), (1000, 7), (1000, 1), (10, 3), (1, 1)])
def test_sampling_timesteps(T, steps):
    times = sampling_timesteps(T, steps)
    assert times.dtype == torch.long and times.shape == (steps + 1,)
    assert times[0] == T and times[-1] == 0
    assert (times[1:] < times[:-1]).all()
    np.testing.assert_array_equal(times.numpy(), np.round(np.linspace(T, 0, steps + 1)).astype(np.int64))


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_sampling_timesteps_rejects_bad_steps(steps):
    with pytest.raises(UserError, match="steps"):
        sampling_timesteps(1000, steps)
    with pytest.raises(UserError):
        sample_ddim(lambda x, t: x, torch.zeros(2, 1), gaussian_process(1000), steps)


# ----------------------------------------------------------------------------------------------
# small helpers that scripts rely on

def test_argparse_types():
    assert common.positive_int("3") == 3 and common.positive_float("0.5") == 0.5
    assert common.nonnegative_float("0") == 0.0
    for function, text in [(common.positive_int, "0"), (common.positive_float, "0"),
                           (common.positive_float, "inf"), (common.positive_float, "nan"),
                           (common.nonnegative_float, "-1e-9")]:
        with pytest.raises(ValueError):
            function(text)


def test_run_logger_off_writes_jsonl_and_write_json(tmp_path):
    import json
    logger = common.RunLogger(str(tmp_path), {"lr": 1e-3}, mode="off")
    logger.log({"loss": 0.5}, step=1)
    logger.log({"loss": torch.tensor(0.25).item(), "fid": np.float64(2.0)}, step=2)
    logger.finish({"loss": 0.25})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)] and records[1]["fid"] == 2.0
    common.write_json(str(tmp_path / "results.json"), {"a": np.float32(1.5)})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1.5}
    assert sorted(name for name in os.listdir(tmp_path) if not name.startswith(".")) == ["metrics.jsonl", "results.json"]


def test_run_logger_truncate_after_drops_the_steps_a_resume_logs_again(tmp_path):
    import json
    logger = common.RunLogger(str(tmp_path), {}, mode="off")
    for step in (1, 2, 3):
        logger.log({"config": "a", "seed": 0, "loss": step}, step=step)
        logger.log({"config": "b", "seed": 0, "loss": step}, step=step)
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"config": "a", "seed": 0, "st')  # a line cut short by a kill
    assert logger.truncate_after(1, config="a", seed=0) == 3  # steps 2, 3 of config a and the broken line
    logger.log({"config": "a", "seed": 0, "loss": 2}, step=2)  # the resumed run logs step 2 again
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps_a = [r["step"] for r in records if r["config"] == "a"]
    steps_b = [r["step"] for r in records if r["config"] == "b"]
    assert steps_a == [1, 2] and steps_b == [1, 2, 3]  # no step twice; other configs untouched
    assert common.RunLogger(str(tmp_path / "new"), {}).truncate_after(0) == 0  # no file yet


def write_idx(path, type_byte=0x08, dims=(2, 3), payload=None, magic=(0, 0)):
    header = bytes([*magic, type_byte, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    payload = bytes(range(int(np.prod(dims)))) if payload is None else payload
    path.write_bytes(header + payload)
    return str(path)


def test_read_idx_reads_a_valid_file(tmp_path):
    array = common.read_idx(write_idx(tmp_path / "ok", dims=(2, 3)))
    assert array.dtype == np.uint8 and array.shape == (2, 3) and array.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("case,kwargs,expected", [
    ("wrong type byte", {"type_byte": 0x0D}, "type byte 0x0d (float32), expected 0x08"),
    ("gzip file", {"magic": (0x1F, 0x8B)}, "not an IDX file"),
    ("wrong magic", {"magic": (0, 7)}, "not an IDX file"),
    ("truncated data", {"payload": bytes(5)}, "needs"),
    ("extra data", {"payload": bytes(9)}, "needs"),
    ("zero dimensions", {"dims": ()}, "dimensions"),
])
def test_read_idx_says_what_is_wrong_in_one_line(tmp_path, case, kwargs, expected):
    with pytest.raises(ValueError) as error:
        common.read_idx(write_idx(tmp_path / "bad", **kwargs))
    assert expected in str(error.value) and "\n" not in str(error.value) and "bad" in str(error.value)


def test_load_mnist_reports_a_bad_idx_file_as_one_user_error(tmp_path):
    for name in common.MNIST_FILES:
        write_idx(tmp_path / name, type_byte=0x0C)
    with pytest.raises(UserError, match="type byte 0x0c"):
        common.load_mnist("mnist", str(tmp_path))


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_stop_signal_flags_and_restores():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = common.StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_atomic_write_leaves_the_old_file_when_a_write_fails_and_names_its_temporary_by_process(tmp_path):
    path = tmp_path / "results.json"
    common.write_json(path, {"a": 1})

    def fail_halfway(file):
        assert file.name.endswith(f"-{os.getpid()}")  # concurrent writers (array tasks) never share a temporary
        file.write('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(path, fail_halfway)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]
