"""Score-based diffusion in function space with a Fourier neural operator (SPEC section 4).

After Lim et al., "Score-based diffusion models in function space", and its reference code
(neuraloperator/DiffusionOperators, first named NO_Diffusion). Functions on [0,1)^2 with two channels
(cos phi, sin phi of an interferogram phase) are perturbed with Gaussian noise whose covariance is white or a
stationary Gaussian random field (sampled by FFT circulant embedding), a sigma-conditioned FNO with Karras
et al.'s (2022) preconditioning learns the denoiser (equivalently the noise, the score times -sigma), and
samples come from annealed Langevin dynamics (the reference's sampler) or Heun's method on the
probability-flow ODE (Karras et al. 2022; 30x fewer network evaluations).

    python no_diffusion.py --outdir runs/nodiff                        # synthetic volcano, 64 px, train + eval, ~13 min
    python no_diffusion.py --config json/rbf.json                      # runs/<run id>/rbf ($SAVEDIR, default runs)
    python no_diffusion.py --config json/indep.json --max-minutes 4    # white noise; flags override the file
    DATA_DIR=/path/to/ints python no_diffusion.py --config json/rbf-reference.json   # the reference's setting
    python no_diffusion.py --outdir runs/nodiff --resume               # continue a stopped run
    python no_diffusion.py eval --exp-dir runs/nodiff --checkpoint model.worst_ratio.pt --Ntest 1024 \\
        --val-batch-size 128 --mode generate|plot|superres

A run directory holds config.json, metrics.jsonl, model.pt (everything to resume), model.<metric>.pt (EMA
weights at the best value of each metric), noise/noise_samples.png, noise/noise_sampler_C.png,
u_noised.png, samples/<epoch>.png (real functions beside generated ones), stats/<epoch>.png (histograms of
the per-function statistics and the radial power spectra, real vs generated) and results.json (the metrics
beside their real-vs-real floors and spreads, and the worst metric/floor ratio).
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

SCRIPT = "no_diffusion"
KIND = "function-score-fno"
DATASETS = ("synthetic-volcano", "volcano", "grf")
METRICS = ("w_var", "w_skew", "w_total", "mean_l2", "phase_l2")
VOLCANO_SIZE = 128                          # the .int files are 128 x 128 complex64 (float32 real, imag)
VOLCANO_FILE_BYTES = VOLCANO_SIZE * VOLCANO_SIZE * 2 * 4
# settings a resumed run must share with the stopped one
RUN_IDENTITY = ("dataset", "n_functions", "resolution", "crop", "val_size", "noise", "kernel", "rbf_scale",
                "rbf_eps", "sigma_1", "sigma_L", "L", "width", "modes", "layers", "levels", "no_sigma_embedding", "local_conv",
                "precondition", "sigma_sampling", "sigma_mean", "sigma_std",
                "batch_size", "lr", "ema_decay", "augment", "seed")


# ----------------------------------------------------------------------------------------------
# noise: white, or a stationary Gaussian random field sampled by circulant embedding

def kernel_values(distance, kernel, scale):
    """Covariance as a function of distance on [0,1)^2. 'se': exp(-d^2 / (2 l^2)) (squared exponential);
    'exponential': exp(-d / (2 l^2)), what the reference calls "RBF" (plain, not squared, distance)."""
    if kernel == "se":
        return torch.exp(-distance**2 / (2 * scale**2))
    if kernel == "exponential":
        return torch.exp(-distance / (2 * scale**2))
    raise UserError(f"unknown --kernel {kernel!r} (se, exponential)")


def kernel_reach(kernel, scale, tolerance=1e-7):
    """Distance beyond which the kernel is below `tolerance`."""
    if kernel == "se":
        return scale * math.sqrt(2 * math.log(1 / tolerance))
    return 2 * scale**2 * math.log(1 / tolerance)


def fast_fft_size(m):
    """The smallest 7-smooth integer >= m (FFT sizes that are fast)."""
    while True:
        rest = m
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


class GaussianNoise:
    """Gaussian noise on the n x n grid {0, 1/n, ..., (n-1)/n}^2, two independent channels.

    kind 'white': N(0, I). kind 'rbf': N(0, C) with C = k(|x - x'|) + nugget^2 I (the reference adds eps^2 I).
    It is drawn by circulant embedding (Dietrich & Newsam 1997): the covariance function (the nugget is a
    delta at distance 0, so it embeds too) is laid out on an m x m torus with m >= n (1 + reach), so that
    the wrapped-around copies are below 1e-7 on the grid, and m >= 2 n reach, so that the kernel has decayed
    at the torus' half-period (no kink, hence no negative eigenvalues); m <= 8 n. The torus
    covariance is diagonalised by the 2-D FFT, its eigenvalues lambda = FFT2(first row). With xi complex
    standard normal (real and imaginary parts N(0, I)), FFT2(sqrt(lambda / m^2) * xi) has real and
    imaginary parts that are independent N(0, C) fields on the torus; their top-left n x n block has the
    covariance C. Cost O(m^2 log m) per two-channel sample and O(m^2) memory, against O(n^6) time and
    O(n^4) memory for the reference's dense Cholesky.
    Negative eigenvalues (an embedding that is too small) are clipped; their share is `clipped_share`."""

    def __init__(self, resolution, kind="rbf", kernel="se", scale=0.05, nugget=0.01, device="cpu"):
        if kind not in ("white", "rbf"):
            raise UserError(f"unknown --noise {kind!r} (white, rbf)")
        self.n, self.kind, self.kernel, self.scale, self.nugget = resolution, kind, kernel, scale, nugget
        self.device = torch.device(device)
        self.clipped_share = 0.0
        if kind == "white":
            return
        n = resolution
        reach = kernel_reach(kernel, scale)
        self.m = fast_fft_size(min(math.ceil(n * max(1 + reach, 2 * reach)), 8 * n))
        index = torch.arange(self.m, dtype=torch.float64)
        wrapped = torch.minimum(index, self.m - index) / n            # torus distance along one axis
        distance = torch.sqrt(wrapped[:, None] ** 2 + wrapped[None, :] ** 2)  # (m, m)
        first_row = kernel_values(distance, kernel, scale)
        first_row[0, 0] += nugget**2
        eigenvalues = torch.fft.fft2(first_row).real
        self.clipped_share = float(-eigenvalues.clamp(max=0).sum() / eigenvalues.abs().sum())
        self.sqrt_eigenvalues = (eigenvalues.clamp(min=0) / self.m**2).sqrt().float().to(self.device)  # (m, m)

    def draw(self, count, generator=None, chunk=256):
        """(count, 2, n, n) float32 noise on self.device; the random numbers come from `generator` (CPU)."""
        n = self.n
        if self.kind == "white":
            return torch.randn(count, 2, n, n, generator=generator).to(self.device)
        fields = []
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            xi = torch.view_as_complex(torch.randn(size, self.m, self.m, 2, generator=generator).to(self.device))
            torus = torch.fft.fft2(xi.mul_(self.sqrt_eigenvalues))[:, :n, :n]   # (size, n, n) complex
            fields.append(torch.view_as_real(torus))                            # (size, n, n, 2): real, imag
        return torch.cat(fields).permute(0, 3, 1, 2)                           # (count, 2, n, n), no copy

    def covariance(self, points=200):
        """The exact covariance between the first `points` grid points (row-major order), (points, points)."""
        if self.kind == "white":
            return torch.eye(points, dtype=torch.float64)
        index = torch.arange(points)
        coords = torch.stack([index // self.n, index % self.n], dim=1).double() / self.n
        return kernel_values(torch.cdist(coords, coords), self.kernel, self.scale) + self.nugget**2 * torch.eye(points)


# ----------------------------------------------------------------------------------------------
# data: (N, 2, R, R) tensors of (cos phi, sin phi), with a fixed held-out split

def read_volcano(data_dir):
    """Phases (N, 128, 128) of every $DATA_DIR/**/*.int (raw complex64, 128 x 128), files in sorted order."""
    if not data_dir or not os.path.isdir(data_dir):
        raise UserError(f"volcano data directory {data_dir!r} does not exist (set DATA_DIR or --data-dir)")
    files = sorted(glob.glob(os.path.join(data_dir, "**", "*.int"), recursive=True))
    if not files:
        raise UserError(f"no *.int files under {data_dir}")
    phases = np.empty((len(files), VOLCANO_SIZE, VOLCANO_SIZE), dtype=np.float32)
    for i, path in enumerate(files):
        size = os.path.getsize(path)
        if size != VOLCANO_FILE_BYTES:
            raise UserError(f"{path} has {size} bytes; a volcano .int file is 128x128 complex64 ({VOLCANO_FILE_BYTES} bytes)")
        raw = np.fromfile(path, dtype=np.float32).reshape(VOLCANO_SIZE, VOLCANO_SIZE, 2)
        phases[i] = np.arctan2(raw[..., 1], raw[..., 0])
    return torch.from_numpy(phases)


def synthetic_volcano_phase(count, seed, size=VOLCANO_SIZE, source_share=1.0, return_sources=False):
    """A seeded look-alike of the volcano interferograms, phases (count, size, size) wrapped to (-pi, pi].

    Mogi (1958) point source at depth d below (x0, y0): vertical surface displacement proportional to
    d / (r^2 + d^2)^{3/2}; here scaled to a peak of 1-5 fringes (2 pi each) of random sign, plus a
    squared-exponential Gaussian-random-field "atmosphere" (length 0.1, 0.3-1.5 rad) and an orbital ramp.
    source_share < 1 keeps the source in that share of the functions only (the others are atmosphere and
    ramp: the source-CNN's negatives); with return_sources, also (count, 5) float64 rows
    (has source, x0, y0, depth, signed fringes). The draws do not depend on source_share."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda low, high: low + (high - low) * torch.rand(count, 1, 1, generator=generator, dtype=torch.float64)
    x0, y0, depth = uniform(0.25, 0.75), uniform(0.25, 0.75), uniform(0.05, 0.2)
    fringes = uniform(1.0, 5.0) * torch.where(torch.rand(count, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    ramp_x, ramp_y = uniform(-1.0, 1.0), uniform(-1.0, 1.0)
    atmosphere_amplitude = uniform(0.3, 1.5)
    coords = torch.arange(size, dtype=torch.float64) / size
    y, x = coords[None, :, None], coords[None, None, :]
    shape = depth**3 / ((x - x0) ** 2 + (y - y0) ** 2 + depth**2) ** 1.5       # (count, size, size), peak 1
    atmosphere = GaussianNoise(size, "rbf", "se", 0.1, 0.0).draw(count, generator)[:, 0].double()
    has_source = torch.ones(count, 1, 1, dtype=torch.float64)
    if source_share < 1:
        has_source = (torch.rand(count, 1, 1, generator=torch.Generator().manual_seed(seed + 1)) < source_share).double()
    phase = (2 * math.pi * fringes * has_source * shape + atmosphere_amplitude * atmosphere
             + math.pi * (ramp_x * x + ramp_y * y))
    phase = torch.atan2(torch.sin(phase), torch.cos(phase)).float()
    if return_sources:
        return phase, torch.cat([has_source, x0, y0, depth, fringes], dim=1).flatten(1)
    return phase


def grf_functions(count, seed, resolution, scale=0.1):
    """Samples of a known Gaussian random field: two independent channels, covariance exp(-d^2 / (2 * 0.1^2))."""
    generator = torch.Generator().manual_seed(seed)
    return GaussianNoise(resolution, "rbf", "se", scale, 0.0).draw(count, generator)


def phase_to_functions(phase, resolution, crop):
    """Phases (N, S, S) -> (cos, sin) (N, 2, R - crop, R - crop): the whole field resampled to R x R
    (bilinear), so every grid size covers the same domain (what super-resolution compares), then `crop`
    pixels cut from the bottom and right (the reference cuts 128 px to 120: --resolution 128 --crop 8)."""
    functions = torch.stack([torch.cos(phase), torch.sin(phase)], dim=1)
    if functions.shape[-1] != resolution:
        functions = F.interpolate(functions, size=(resolution, resolution), mode="bilinear",
                                  antialias=resolution < functions.shape[-1], align_corners=False)
    return functions[..., :resolution - crop, :resolution - crop].contiguous()


def load_functions(dataset, resolution, crop=0, n_functions=4096, val_size=0.1, data_dir="./data", seed=0):
    """{'train', 'held_out'} (N, 2, r, r) float32 on the CPU, r = resolution - crop, plus 'name' and 'reason'.

    Generated sets (synthetic-volcano, grf) are cached in data_dir. The held-out split is fixed: a
    permutation with seed 0 (whatever --seed), the last val_size share held out."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "volcano":
        volcano_dir = os.environ.get("DATA_DIR") or data_dir
        functions, reason = phase_to_functions(read_volcano(volcano_dir), resolution, crop), f"read from {volcano_dir}"
    else:
        path = os.path.join(data_dir, f"no_diffusion-{dataset}-n{n_functions}-seed{seed}-res{resolution}.pt")
        functions = None
        if os.path.isfile(path):
            try:
                functions, reason = torch.load(path, weights_only=True).float(), f"cached in {path}"
            except Exception as error:
                print(f"cache {path} unreadable ({type(error).__name__}); regenerating it")
        generate = lambda count, seed: (grf_functions(count, seed, resolution) if dataset == "grf" else
                                        phase_to_functions(synthetic_volcano_phase(count, seed), resolution, 0))
        if functions is None:
            start = time.time()
            functions = generate(n_functions, seed)
            reason = f"generated in {time.time() - start:.1f} s"
            try:
                common.prepare_outdir(data_dir)
                common.save_checkpoint(path, functions.half())
                reason += f", cached in {path}"
            except (UserError, OSError) as error:
                print(f"could not cache the data in {data_dir} ({error}); continuing")
            functions = functions.half().float()  # the same values whether or not the cache was hit
        functions = functions[..., :resolution - crop, :resolution - crop].contiguous()
    count = len(functions)
    held_out_count = max(1, int(round(count * val_size)))
    if count - held_out_count < 1:
        raise UserError(f"{dataset}: {count} functions are too few for a held-out share of {val_size}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    data = {"train": functions[order[:count - held_out_count]], "held_out": functions[order[count - held_out_count:]],
            "name": dataset, "reason": reason}
    if dataset != "volcano":  # fresh functions of the same law for floors of many samples: another stream (torch
        # seeds its CPU generator with the seed's low 32 bits, so the seed must differ from --seed modulo 2^32)
        fresh_seed = (seed + 2**31) % 2**32
        data["more"] = lambda extra: generate(extra, fresh_seed).half().float()[..., :resolution - crop, :resolution - crop]
    print(f"dataset: {dataset} ({len(data['train'])} train / {len(data['held_out'])} held out, "
          f"{functions.shape[-1]}x{functions.shape[-1]} px): {reason}")
    return data


# ----------------------------------------------------------------------------------------------
# model: a sigma-conditioned Fourier neural operator

class SpectralConv2d(nn.Module):
    """Fourier layer (Li et al. 2021, "Fourier Neural Operator", Eq. 4): (K h)(x) = IFFT(R . FFT(h))(x).

    Only the lowest `modes` frequencies per axis are kept, in physical units (cycles per unit length):
    the same weights act on the same frequencies at every resolution, which is what makes the layer a map
    between functions rather than between grids. rfft2 keeps the non-negative frequencies of the last
    axis, so two blocks of weights cover the positive and the negative frequencies of the other axis.
    norm='forward' makes the Fourier coefficients grid-independent (FFT / n^2). Why 12 by default: the
    atmosphere has little energy above ~10 cycles per domain (the fringes near a source have more), 12
    modes fit any grid from 24 px up, and 24 modes, measured at equal CPU time, gave rougher samples
    (Fourier ringing) and no better sources (BENCHMARKS.md); what a fixed mode count cannot express is
    left to the 1x1 convolution beside it. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, modes):
        super().__init__()
        self.modes = modes
        scale = 1 / (in_channels * out_channels)
        # (corner, C_in, C_out, modes, modes, real/imag)
        self.weight = nn.Parameter(scale * torch.rand(2, in_channels, out_channels, modes, modes, 2))

    def forward(self, x):
        batch, _, height, width = x.shape
        spectrum = torch.view_as_real(torch.fft.rfft2(x.float(), norm="forward"))   # (B, C_in, H, W // 2 + 1, 2)
        rows, cols = min(self.modes, height // 2), min(self.modes, width // 2 + 1)
        kept = torch.cat([spectrum[:, :, :rows, :cols], spectrum[:, :, -rows:, :cols]], dim=2)   # (B, C_in, 2 rows, cols, 2)
        mixed = complex_mode_product(kept, self.mode_weights(rows, cols))                        # (B, C_out, 2 rows, cols, 2)
        gap = mixed.new_zeros(batch, mixed.shape[1], height - 2 * rows, cols, 2)                  # the frequencies dropped
        full = F.pad(torch.cat([mixed[:, :, :rows], gap, mixed[:, :, rows:]], dim=2), (0, 0, 0, width // 2 + 1 - cols))
        return torch.fft.irfft2(torch.view_as_complex(full.contiguous()), s=(height, width), norm="forward")

    def mode_weights(self, rows, cols):
        """R for the kept frequencies, (C_in, C_out, 2 rows, cols, 2): the positive rows, then the negative ones."""
        return torch.cat([self.weight[0, :, :, :rows, :cols], self.weight[1, :, :, :rows, :cols]], dim=2)


def complex_mode_product(spectrum, weight):
    """out[b, o, k] = sum_i spectrum[b, i, k] * weight[i, o, k] for every frequency k, complex numbers stored as
    (real, imaginary) pairs in the last axis: (B, C_in, X, Y, 2), (C_in, C_out, X, Y, 2) -> (B, C_out, X, Y, 2).
    One real batched matrix product over the X*Y frequencies, each complex weight as the 2x2 real block
    [[re, im], [-im, re]]: the same numbers as a complex einsum, about 1.3x faster forward and backward on the
    CPU, where complex batched products (and their gradients) run one matrix at a time."""
    batch, in_channels, rows, cols, _ = spectrum.shape
    out_channels = weight.shape[1]
    real, imaginary = weight[..., 0], weight[..., 1]                                        # (C_in, C_out, X, Y)
    block = torch.stack([torch.stack([real, imaginary], dim=-1), torch.stack([-imaginary, real], dim=-1)], dim=1)
    block = block.permute(3, 4, 0, 1, 2, 5).reshape(rows * cols, 2 * in_channels, 2 * out_channels)
    pairs = spectrum.permute(2, 3, 0, 1, 4).reshape(rows * cols, batch, 2 * in_channels)
    product = torch.bmm(pairs, block)                                                        # (X*Y, B, 2 C_out)
    return product.view(rows, cols, batch, out_channels, 2).permute(2, 3, 0, 1, 4)


class FNOBlock(nn.Module):
    """h + GELU(FiLM(GroupNorm(K h + W h + D h), sigma embedding)); without an embedding, plain GroupNorm.

    K: the spectral convolution (global, the lowest `modes` frequencies); W: a 1x1 convolution (pointwise);
    D (local_grid > 0): a 3x3 convolution for what the kept modes cannot express (the fringes near a
    source reach ~30 cycles per domain). Its footprint is fixed in units of the domain, 3 px of a
    local_grid x local_grid grid: at a finer grid it is dilated (dilation = grid / local_grid), so a model
    trained at 64 px evaluated at 128 px sees the same neighbourhood (cf. Liu-Schiaffini et al. 2024,
    "Neural operators with localized integral and differential kernels")."""

    def __init__(self, width, modes, emb_dim, local_grid=0):
        super().__init__()
        self.spectral = SpectralConv2d(width, width, modes)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.local_grid = local_grid
        self.local = nn.Conv2d(width, width, 3, bias=False) if local_grid else None
        norm = nn.GroupNorm(8 if width % 8 == 0 else 1, width)
        self.film = common.FiLM(emb_dim, width, norm) if emb_dim else None
        self.norm = None if emb_dim else norm

    def forward(self, h, emb):
        mixed = self.spectral(h) + self.pointwise(h)
        if self.local is not None:
            dilation = max(1, round(h.shape[-1] / self.local_grid))
            mixed = mixed + F.conv2d(h, self.local.weight, padding=dilation, dilation=dilation)
        mixed = self.film(mixed, emb) if self.film is not None else self.norm(mixed)
        return h + F.gelu(mixed)


class ScoreFNO(nn.Module):
    """n_theta(x, sigma): predicts the noise in x = u + sigma * z, z ~ N(0, C). The score of the perturbed
    data (preconditioned by C) is -n_theta / sigma.

    (x, grid) with 4 channels -> lift 1x1 to `width` -> zero-pad by 1/8 of the grid (bottom, right; the
    data are not periodic) -> `layers` FNO blocks -> crop -> project 1x1 to 2 channels. The noise level
    enters as a sinusoidal embedding of log sigma -> MLP -> FiLM in every block, and as the input scale
    1 / sqrt(1 + sigma^2) (Karras et al. 2022, c_in). sigma_embedding=False is the reference's design: the
    network never sees sigma, and the score is its output divided by sigma. (B, 2, H, W), (B,) -> (B, 2, H, W)."""

    def __init__(self, width=32, modes=12, layers=4, sigma_embedding=True, emb_dim=128, pad_fraction=0.125,
                 local_grid=0, sigma_data=0.0, levels=1):
        super().__init__()
        self.sigma_data = sigma_data      # > 0: EDM preconditioning (Karras et al. 2022, Table 1), see forward
        self.emb_dim = emb_dim if sigma_embedding else 0
        self.pad_fraction = pad_fraction
        self.lift = nn.Conv2d(4, width, 1)
        self.sigma_mlp = (nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if sigma_embedding else None)
        self.levels = levels
        if levels == 1:   # the plain FNO: `layers` blocks on the input grid
            self.blocks = nn.ModuleList(FNOBlock(width, modes, self.emb_dim, local_grid) for _ in range(layers))
        else:             # U-shaped (see network): level l has width * 2^l channels on a grid 2^l times coarser
            if not local_grid:
                raise ValueError("a U-shaped operator needs local_grid, the training grid its coarse levels follow")
            self.local_grid = local_grid
            widths = [width * 2**level for level in range(levels)]
            level_modes = [min(modes, max(4, local_grid // 2**(level + 1))) for level in range(levels)]
            grids = [max(1, local_grid // 2**level) for level in range(levels)]
            block = lambda level: FNOBlock(widths[level], level_modes[level], self.emb_dim, grids[level])
            self.down = nn.ModuleList(block(level) for level in range(levels))
            self.widen = nn.ModuleList(nn.Conv2d(widths[level], widths[level + 1], 1) for level in range(levels - 1))
            self.middle = block(levels - 1)
            self.merge = nn.ModuleList(nn.Conv2d(widths[level + 1] + widths[level], widths[level], 1)
                                       for level in range(levels - 1))
            self.up = nn.ModuleList(block(level) for level in range(levels - 1))
        self.project = nn.Sequential(nn.Conv2d(width, 64, 1), nn.GELU(), nn.Conv2d(64, 2, 1))

    @staticmethod
    def grid(batch, height, width, device):
        """Positions (B, 2, H, W) on [0,1)^2, the same points the noise and the data live on."""
        y = torch.arange(height, device=device, dtype=torch.float32) / height
        x = torch.arange(width, device=device, dtype=torch.float32) / width
        return torch.stack(torch.meshgrid(y, x, indexing="ij")).expand(batch, -1, -1, -1)

    def forward(self, x, sigma):
        """The predicted noise n_theta(x, sigma), whatever the parametrisation. With sigma_data > 0 the
        network F is EDM-preconditioned: the denoiser is D = c_skip x + c_out F(c_in x), c_skip = s_d^2 / s^2,
        c_out = sigma s_d / s, c_in = 1 / s, s^2 = sigma^2 + s_d^2, so n = (x - D) / sigma
        = sigma x / s^2 - (s_d / s) F: F's target has unit variance at every noise level."""
        if self.sigma_data and self.sigma_mlp is not None:
            total = (sigma**2 + self.sigma_data**2).view(-1, 1, 1, 1)                       # s^2, (B, 1, 1, 1)
            network = self.network(x / total.sqrt(), sigma)
            return sigma.view(-1, 1, 1, 1) * x / total - self.sigma_data / total.sqrt() * network
        if self.sigma_mlp is not None:
            x = x / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1)
        return self.network(x, sigma)

    def network(self, x, sigma):
        batch, _, height, width = x.shape
        emb = None
        if self.sigma_mlp is not None:
            emb = self.sigma_mlp(common.timestep_embedding(100 * torch.log(sigma), self.emb_dim))  # (B, emb_dim)
        h = self.lift(torch.cat([x, self.grid(batch, height, width, x.device)], dim=1))
        pad = round(self.pad_fraction * height), round(self.pad_fraction * width)
        h = F.pad(h, [0, pad[1], 0, pad[0]])
        if self.levels == 1:
            for block in self.blocks:
                h = block(h, emb)
        else:
            h = self.u_shape(h, emb, height)
        return self.project(h[..., :height, :width])

    def u_shape(self, h, emb, height):
        """The U-shaped operator (after Rahman et al. 2023, "U-NO: U-shaped neural operators"): a block per
        level on the way down, one at the bottom, one per level on the way up, each finer level merged with
        the coarser one resampled to its grid. The coarse grids are fixed in units of the domain (level l:
        local_grid / 2^l points per unit length, whatever the input grid), so a model trained at 64 px and
        evaluated at 128 px sees the same coarse levels; only the finest level follows the input grid, and its
        3x3 convolution is dilated to keep its footprint (FNOBlock). Resampling is bilinear (antialiased on
        the way down). (B, width, H', W') -> (B, width, H', W'), H' the padded grid."""
        skips, padded = [], h.shape[-2:]
        for level in range(self.levels):
            if level:
                size = [max(2, round(n * self.local_grid / (height * 2**level))) for n in padded]
                h = self.widen[level - 1](F.interpolate(h, size=size, mode="bilinear", antialias=True, align_corners=False))
            h = self.down[level](h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for level in reversed(range(self.levels - 1)):
            skip = skips[level]
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[level](self.merge[level](torch.cat([h, skip], dim=1)), emb)
        return h


def model_args_of(args, grid, sigma_data):
    return {"width": args.width, "modes": args.modes, "layers": args.layers,
            "sigma_embedding": not args.no_sigma_embedding,
            "local_grid": grid if args.local_conv or args.levels > 1 else 0,
            "sigma_data": sigma_data if args.precondition == "edm" else 0.0, "levels": args.levels}


def loss_weights(args, sigma, sigma_data):
    """Per-sample weights of |n_theta - z|^2 (B,). The reference's and Song & Ermon's sigma^2-weighted score
    matching is |n_theta - z|^2 itself, which weighs the denoiser's error |D - u|^2 by 1 / sigma^2: the
    levels where the structure is decided (sigma ~ 0.3-3 here) count little. EDM's weight (Karras et al.
    2022, Eq. 8: lambda = (sigma^2 + s_d^2) / (sigma s_d)^2 on |D - u|^2) is (1 + sigma^2 / s_d^2) on it."""
    return 1 + sigma**2 / sigma_data**2 if args.precondition == "edm" else torch.ones_like(sigma)


def geometric_sigmas(sigma_1, sigma_L, L):
    """sigma_i = sigma_1 (sigma_L / sigma_1)^{(i-1)/(L-1)}, i = 1..L (Song & Ermon 2019, Sec. 4.2), shape (L,)."""
    if L == 1:
        return torch.tensor([sigma_1], dtype=torch.float64)
    return sigma_1 * (sigma_L / sigma_1) ** (torch.arange(L, dtype=torch.float64) / (L - 1))


def training_sigmas(args, sigmas, count, generator):
    """(count,) float64 noise levels of a training batch: uniform over the geometric levels (the reference's,
    Song & Ermon 2019), or log-normal (Karras et al. 2022, Sec. 5: ln sigma ~ N(P_mean, P_std^2)), which
    spends the steps where the data and the noise are of similar size instead of on levels where the
    network's answer is trivial (the noise at sigma >> 1, nothing to remove at sigma << 0.01)."""
    if args.sigma_sampling == "levels":
        return sigmas[torch.randint(0, len(sigmas), (count,), generator=generator)]
    log_sigma = args.sigma_mean + args.sigma_std * torch.randn(count, generator=generator, dtype=torch.float64)
    return log_sigma.exp().clamp(args.sigma_L, args.sigma_1)


def noise_predictor(model, batch_size=None):
    """predict_noise(x, sigma) with a float sigma, in eval mode, no grad, in batches of batch_size."""
    def predict_noise(x, sigma):
        chunks = []
        size = batch_size or len(x)
        for start in range(0, len(x), size):
            part = x[start:start + size]
            chunks.append(model(part, torch.full((len(part),), float(sigma), device=x.device)).float())
        return torch.cat(chunks)
    return predict_noise


# ----------------------------------------------------------------------------------------------
# samplers: sampler(predict_noise, x, sigmas, draw_noise, progress=False, **options) -> (samples, evaluations)
# x: the start, sigma_1 * noise, (B, 2, H, W); sigmas: the geometric schedule (L,); draw_noise(B) -> (B, 2, H, W)

@torch.no_grad()
def sample_langevin(predict_noise, x, sigmas, draw_noise, progress=False, T=3, epsilon=6e-6):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) exactly as the reference's sample_trace:
    for each level i, T steps x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z, alpha_i =
    epsilon sigma_i^2 / sigma_L^2, z drawn from the training noise (the learned score is preconditioned by
    its covariance C); the very last step adds no noise (the final denoising step). L * T evaluations."""
    sigma_L = float(sigmas[-1])
    levels = len(sigmas)
    for i in tqdm(range(levels), disable=not progress, leave=False, mininterval=1.0, desc="langevin"):
        sigma = float(sigmas[i])
        alpha = epsilon * (sigma / sigma_L) ** 2
        for t in range(T):
            score = -predict_noise(x, sigma) / sigma
            x = x + 0.5 * alpha * score
            if not (i == levels - 1 and t == T - 1):
                x = x + math.sqrt(alpha) * draw_noise(len(x))
    return x, levels * T


def karras_sigmas(sigma_max, sigma_min, steps, rho=7.0):
    """Karras et al. 2022, Eq. 5: steps levels from sigma_max to sigma_min, denser near sigma_min."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def sample_heun(predict_noise, x, sigmas, draw_noise, progress=False, steps=25, churn=0.0, sigma_max=None, rho=7.0):
    """Probability-flow ODE of the variance-exploding process (Song et al. 2021, Eq. 13), which for
    x = u + sigma z, z ~ N(0, C) reads dx/dsigma = -sigma C grad log p_sigma(x) = n_theta(x, sigma), solved with
    Heun's 2nd-order method on Karras et al.'s (2022, Alg. 2) levels (Eq. 5, exponent rho) from sigma_max
    (default sigma_1; x must start at that level) to sigma_L, then one Euler step to sigma = 0 (the denoising
    step x - sigma_L n_theta). churn > 0 adds their stochastic "churn" (gamma = min(churn / steps, sqrt(2) - 1) of
    extra noise per step, from the training noise). 2 steps - 1 evaluations."""
    sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
    levels = torch.cat([karras_sigmas(sigma_max, float(sigmas[-1]), steps, rho), torch.zeros(1, dtype=torch.float64)])
    gamma = min(churn / steps, math.sqrt(2) - 1)
    evaluations = 0
    for i in tqdm(range(steps), disable=not progress, leave=False, mininterval=1.0, desc="heun"):
        sigma, sigma_next = float(levels[i]), float(levels[i + 1])
        if gamma > 0 and sigma_next > 0:
            sigma_hat = sigma * (1 + gamma)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * draw_noise(len(x))
            sigma = sigma_hat
        slope = predict_noise(x, sigma)
        x_next = x + (sigma_next - sigma) * slope
        evaluations += 1
        if sigma_next > 0:
            x_next = x + (sigma_next - sigma) * 0.5 * (slope + predict_noise(x_next, sigma_next))
            evaluations += 1
        x = x_next
    return x, evaluations


SAMPLERS = {"langevin": sample_langevin, "heun": sample_heun}
VAL_BATCH_HELP = "batch size when sampling (default: 128 on a GPU; on a CPU 32 functions at 64 px, fewer on larger grids)"


def sampler_options(args):
    """The keyword arguments of args.sampler; Heun's sigma_max and rho only where an eval set them."""
    if args.sampler == "langevin":
        return {"T": args.T, "epsilon": args.epsilon}
    options = {"steps": args.steps, "churn": args.churn}
    return {**options, **{key: getattr(args, key) for key in ("sigma_max", "rho") if getattr(args, key, None) is not None}}


def sampling_batch_size(requested, device, grid):
    """--val-batch-size, else 128 on a GPU, and on a CPU as many functions as 32 at 64x64 (131k grid points):
    larger batches fall out of the CPU's caches (measured on 2 cores: 6.8 ms per function and evaluation
    at batch 32, 17.7 ms at batch 128)."""
    if requested:
        return requested
    return 128 if device.type == "cuda" else max(1, 32 * 64**2 // grid**2)


@torch.no_grad()
def generate_functions(model, noise, sigmas, count, sampler, options, batch_size, seed, device, progress=False):
    """count samples (count, 2, n, n) on the CPU, the network evaluations per sample, and the seconds taken;
    each starts as noise at the sampler's first level (options' sigma_max, else sigma_1)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    draw = lambda size: noise.draw(size, generator).to(device)
    predict_noise = noise_predictor(model)
    out, evaluations, start = [], 0, time.time()
    for begin in range(0, count, batch_size):
        size = min(batch_size, count - begin)
        x = options.get("sigma_max", float(sigmas[0])) * draw(size)
        x, evaluations = SAMPLERS[sampler](predict_noise, x, sigmas, draw, progress=progress, **options)
        out.append(x.float().cpu())
    return torch.cat(out), evaluations, time.time() - start


# ----------------------------------------------------------------------------------------------
# metrics: circular statistics of the phase (the reference's), spatial structure of exp(i phi), and the
# source-CNN's features (the synthetic volcano's FID), each compared with the training set

STRUCTURE = ("spectrum", "acf_1", "acf_4", "acf_16", "gradient", "residues", "source_fd")
HEADLINE = ("w_total",) + STRUCTURE          # worst_ratio = the largest metric / floor among these
ACF_LAGS = (1, 4, 16)                        # in 1/64 of the domain: 1, 4, 16 px at 64 px, 2, 8, 32 at 128
SOURCE_CNN_SIZE = 64                         # the source-CNN sees every function resampled to 64 x 64


def wrap_phase(angle):
    """angle wrapped to (-pi, pi]: the phase difference as an interferogram records it."""
    return torch.atan2(torch.sin(angle), torch.cos(angle))


def phase_of(functions):
    """phi = atan2(sin, cos): (N, 2, H, W) -> (N, H, W)."""
    return torch.atan2(functions[:, 1].double(), functions[:, 0].double())


def circular_statistics(functions):
    """Per-function circular variance and skewness of the phase (Mardia & Jupp 2000; as the reference):
    C_k = sum cos(k phi), S_k = sum sin(k phi), R_k = sqrt(C_k^2 + S_k^2) / n, T_k = atan2(S_k, C_k);
    variance = 1 - R_1; skewness = R_2 sin(T_2 - 2 T_1) / (1 - R_1)^{3/2}. Returns two (N,) float64 arrays."""
    phase = phase_of(functions).flatten(1)                      # (N, H*W)
    count = phase.shape[1]
    c1, s1 = torch.cos(phase).sum(1), torch.sin(phase).sum(1)
    c2, s2 = torch.cos(2 * phase).sum(1), torch.sin(2 * phase).sum(1)
    r1, r2 = torch.sqrt(c1**2 + s1**2) / count, torch.sqrt(c2**2 + s2**2) / count
    t1, t2 = torch.atan2(s1, c1), torch.atan2(s2, c2)
    return (1 - r1).numpy(), (r2 * torch.sin(t2 - 2 * t1) / (1 - r1) ** 1.5).numpy()


def radial_power_spectrum(functions):
    """Radially averaged power spectrum of exp(i phi), (N, n // 2): bin k holds the mean of |c_q|^2 over
    the wave vectors q (cycles per domain) with k - 1/2 <= |q| < k + 1/2, c = FFT2(exp(i phi)) / n^2 (so
    the bins mean the same at every grid size, and sum |c_q|^2 = 1 by Parseval)."""
    phase = phase_of(functions)
    n = phase.shape[-1]
    power = torch.fft.fft2(torch.polar(torch.ones_like(phase), phase), norm="forward").abs() ** 2   # (N, n, n)
    frequency = torch.fft.fftfreq(n, d=1 / n, dtype=torch.float64)                                # cycles/domain
    radius = torch.sqrt(frequency[:, None] ** 2 + frequency[None, :] ** 2).round().long().flatten()  # (n*n,)
    bins = n // 2
    keep = radius < bins
    totals = torch.zeros(len(phase), bins, dtype=torch.float64).index_add_(1, radius[keep], power.flatten(1)[:, keep])
    return totals / torch.bincount(radius[keep], minlength=bins)


def spatial_autocorrelation(functions, lags=ACF_LAGS):
    """Per-function autocorrelation of exp(i phi) at lags in 1/64 of the domain, (N, len(lags)):
    Re mean_x exp(i (phi(x) - phi(x + l e))), averaged over e = the x and the y axis (no wrap-around)."""
    phase = phase_of(functions)
    n = phase.shape[-1]
    columns = []
    for lag in lags:
        step = max(1, round(lag * n / 64))
        along_x = torch.cos(phase[..., step:] - phase[..., :-step]).mean((-2, -1))
        along_y = torch.cos(phase[..., step:, :] - phase[..., :-step, :]).mean((-2, -1))
        columns.append((along_x + along_y) / 2)
    return torch.stack(columns, dim=1)


def phase_gradient(functions):
    """Per-function mean magnitude of the wrapped phase gradient, radians per domain length (the fringe
    density: 2 pi times the fringes crossed per unit length), (N,). Differences are wrapped to (-pi, pi]."""
    phase = phase_of(functions)
    n = phase.shape[-1]
    d_x = wrap_phase(phase[..., :-1, 1:] - phase[..., :-1, :-1])
    d_y = wrap_phase(phase[..., 1:, :-1] - phase[..., :-1, :-1])
    return (n * torch.sqrt(d_x**2 + d_y**2)).mean((-2, -1))


def phase_residues(functions):
    """Per-function count of phase residues, (N,): the 2x2 pixel loops around which the wrapped phase
    differences add up to +-2 pi instead of 0 (Goldstein, Zebker & Werner 1988, the points phase unwrapping
    must cut around). They are the singularities of exp(i phi), where its phase jumps: a continuous phase
    has none, so the count says how many such jumps a field carries; a singularity is a point, so the count
    means the same at every grid size (aliased fringes, closer than 2 px, add some at coarse grids)."""
    phase = phase_of(functions)
    corners = phase[..., :-1, :-1], phase[..., :-1, 1:], phase[..., 1:, 1:], phase[..., 1:, :-1]
    winding = sum(wrap_phase(corners[(i + 1) % 4] - corners[i]) for i in range(4))    # (N, H-1, W-1): 0 or +-2 pi
    return (winding.abs() > math.pi).sum((-2, -1)).double()


class SourceCNN(nn.Module):
    """Recovers the synthetic volcano's deformation source from a function (2, 64, 64): whether there is
    one (a logit), and its x0, y0, depth and signed fringe count (normalised). Its 128-D penultimate
    features play the role Inception's play in FID. Four stride-2 3x3 conv blocks 64 -> 4 px, then FC."""

    def __init__(self, width=16, features=128):
        super().__init__()
        layers, channels = [], 2
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, features), nn.SiLU())
        self.head = nn.Linear(features, 5)

    def forward(self, x):
        """(B, 2, 64, 64) -> (features (B, 128), logit (B,), source parameters (B, 4))."""
        features = self.features(self.convs(x))
        out = self.head(features)
        return features, out[:, 0], out[:, 1:]


SOURCE_CENTRE = torch.tensor([0.5, 0.5, 0.125, 0.0], dtype=torch.float64)   # x0, y0, depth, signed fringes
SOURCE_SPREAD = torch.tensor([0.25, 0.25, 0.075, 5.0], dtype=torch.float64)  # so each target is about [-1, 1]


def to_source_grid(functions):
    """Functions (N, 2, n, n) resampled to the source-CNN's 64 x 64 (the whole domain, as the data are)."""
    if functions.shape[-1] == SOURCE_CNN_SIZE:
        return functions.float()
    return F.interpolate(functions.float(), size=(SOURCE_CNN_SIZE, SOURCE_CNN_SIZE), mode="bilinear",
                         antialias=functions.shape[-1] > SOURCE_CNN_SIZE, align_corners=False)


def source_cnn_examples(count, seed):
    """count functions (count, 2, 64, 64) and their (count, 5) source rows for the source-CNN: half
    synthetic volcanoes with a source; of the other half a third each without a source, with a patchy
    short-range random-field phase instead (length 0.02-0.04, 2-6 rad), and a volcano with its pixels
    shuffled, so that "a source found" means concentric fringes, not any phase texture."""
    phase, sources = synthetic_volcano_phase(count, seed, source_share=0.5, return_sources=True)
    generator = torch.Generator().manual_seed(seed + 2)
    negative = torch.nonzero(sources[:, 0] == 0).flatten()
    kind = torch.randint(0, 3, (len(negative),), generator=generator)
    textured, shuffled = negative[kind == 1], negative[kind == 2]
    for index in textured.tolist():
        length = 0.02 + 0.02 * float(torch.rand(1, generator=generator))
        amplitude = 2 + 4 * float(torch.rand(1, generator=generator))
        field = GaussianNoise(phase.shape[-1], "rbf", "se", length, 0.0).draw(1, generator)[0, 0]
        phase[index] = torch.atan2(torch.sin(amplitude * field), torch.cos(amplitude * field))
    positive = torch.nonzero(sources[:, 0] == 1).flatten()
    for index, source in zip(shuffled.tolist(), positive.tolist()):
        order = torch.randperm(phase[0].numel(), generator=generator)
        phase[index] = phase[source].flatten()[order].view_as(phase[index])
    return phase_to_functions(phase, SOURCE_CNN_SIZE, 0), sources


def train_source_cnn(count=8192, epochs=4, seed=12345, batch_size=64, progress=False):
    """Trains the source-CNN on source_cnn_examples of a seed no dataset uses; Adam (one-cycle), BCE on the
    detection logit + MSE on the normalised parameters of the sources."""
    inputs, sources = source_cnn_examples(count, seed)
    targets = ((sources[:, 1:] - SOURCE_CENTRE) / SOURCE_SPREAD).float()
    has_source = sources[:, 0].float()
    torch.manual_seed(seed)
    cnn = SourceCNN()
    optimizer = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    steps = epochs * (count // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), disable=not progress, leave=False, desc="source-CNN"):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            _, logit, predicted = cnn(inputs[index])
            positive = has_source[index]
            loss = (F.binary_cross_entropy_with_logits(logit, positive)
                    + ((predicted - targets[index]) ** 2).mean(1).mul(positive).sum() / positive.sum().clamp(min=1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return cnn.eval()


def load_source_cnn(data_dir, device="cpu"):
    """The cached source-CNN from data_dir (trained once, about a minute on a CPU, when absent)."""
    path = os.path.join(data_dir, "no_diffusion-source-cnn-v1.pt")
    cnn = SourceCNN()
    if os.path.isfile(path):
        try:
            state = torch.load(path, weights_only=True)
            cnn.load_state_dict(state["model"])
            return cnn.to(device).eval()
        except Exception as error:
            print(f"source-CNN {path} unreadable ({type(error).__name__}); training it again")
    start = time.time()
    cnn = train_source_cnn()
    print(f"source-CNN trained in {time.time() - start:.0f} s", end="")
    try:
        common.prepare_outdir(data_dir)
        common.save_checkpoint(path, {"model": cnn.state_dict(), "meta": {"kind": "source-cnn", "version": 1}})
        print(f", cached in {path}")
    except (UserError, OSError) as error:
        print(f"; could not cache it in {data_dir} ({error})")
    return cnn.to(device).eval()


@torch.no_grad()
def source_outputs(cnn, functions, batch_size=512):
    """(features (N, 128), found (N,) bool: detection probability > 1/2, parameters (N, 4) in data units)."""
    device = next(cnn.parameters()).device
    features, found, parameters = [], [], []
    for start in range(0, len(functions), batch_size):
        feature, logit, predicted = cnn(to_source_grid(functions[start:start + batch_size]).to(device))
        features.append(feature.double().cpu())
        found.append(logit.cpu() > 0)
        parameters.append(predicted.double().cpu() * SOURCE_SPREAD + SOURCE_CENTRE)
    return torch.cat(features), torch.cat(found), torch.cat(parameters)


def statistics_of(functions, source_cnn=None):
    """Everything the metrics compare, computed once per set of functions (N, 2, n, n)."""
    variance, skewness = circular_statistics(functions)
    stats = {"variance": variance, "skewness": skewness, "mean": functions.double().mean(0),
             "spectrum": radial_power_spectrum(functions).mean(0), "acf": spatial_autocorrelation(functions).numpy(),
             "gradient": phase_gradient(functions).numpy(), "residues": phase_residues(functions).numpy(),
             "count": len(functions)}
    if source_cnn is not None:
        stats["features"], found, _ = source_outputs(source_cnn, functions)
        stats["features"] = stats["features"].numpy()
        stats["source_found"] = float(found.double().mean())
    return stats


def compare(stats, reference):
    """The metrics of one set's statistics against the reference (training) set's. w_var, w_skew: 1-D
    Wasserstein distances between the per-function circular statistics, w_total = their sum (the
    reference's metrics); mean_l2 = RMS over [0,1)^2 and channels of the difference of the mean functions,
    phase_l2 = RMS of the wrapped difference of their phases; spectrum = RMSE of log10 of the mean radial
    power spectra; acf_<lag> = W1 of the per-function autocorrelation at that lag; gradient = W1 of the
    per-function mean phase-gradient magnitude divided by 2 pi (fringes per domain length); residues = W1 of
    the per-function count of phase residues (phase_residues: the points where the phase jumps); source_fd =
    the Frechet distance of the source-CNN's features; source_found = the share it finds a source in."""
    from scipy.stats import wasserstein_distance
    w_var = wasserstein_distance(reference["variance"], stats["variance"])
    w_skew = wasserstein_distance(reference["skewness"], stats["skewness"])
    mean_difference = stats["mean"] - reference["mean"]                                    # (2, H, W)
    phase_difference = phase_of(stats["mean"][None]) - phase_of(reference["mean"][None])
    phase_difference = wrap_phase(phase_difference)
    log_spectra = torch.log10(stats["spectrum"] + 1e-12), torch.log10(reference["spectrum"] + 1e-12)
    metrics = {"w_var": float(w_var), "w_skew": float(w_skew), "w_total": float(w_var + w_skew),
               "mean_l2": float(mean_difference.pow(2).mean().sqrt()),
               "phase_l2": float(phase_difference.pow(2).mean().sqrt()),
               "spectrum": float((log_spectra[0] - log_spectra[1]).pow(2).mean().sqrt()),
               "gradient": float(wasserstein_distance(reference["gradient"], stats["gradient"]) / (2 * math.pi)),
               "residues": float(wasserstein_distance(reference["residues"], stats["residues"]))}
    for column, lag in enumerate(ACF_LAGS):
        metrics[f"acf_{lag}"] = float(wasserstein_distance(reference["acf"][:, column], stats["acf"][:, column]))
    if "features" in stats and "features" in reference:
        metrics["source_fd"] = common.frechet_distance(stats["features"], reference["features"])
        metrics["source_found"] = stats["source_found"]
    return metrics


def function_metrics(generated, reference_functions, reference_stats=None, source_cnn=None):
    """compare() of generated functions against reference functions (or their precomputed statistics)."""
    return compare(statistics_of(generated, source_cnn), reference_stats or statistics_of(reference_functions, source_cnn))


def real_floor(data, count, reference_stats=None, source_cnn=None, draws=4):
    """What a perfect sampler scores with `count` samples: the metrics of `count` real functions not
    trained on against the training set (the real-vs-real floor; it falls as the count grows, so the
    counts must match), as the mean over `draws` disjoint sets, with their standard deviation as the
    floor's spread ({metric: value}, {metric: spread}, the count). A generated data set tops the held-out
    split up with fresh functions of the same law; real data cannot, and draw bootstrap resamples of it."""
    reference_stats = reference_stats or statistics_of(data["train"], source_cnn)
    held_out = data["held_out"]
    if count * draws > len(held_out) and "more" in data:
        held_out = torch.cat([held_out, data["more"](count * draws - len(held_out))])
    if count * draws <= len(held_out):
        sets = [held_out[i * count:(i + 1) * count] for i in range(draws)]
    else:
        if count > len(held_out):
            print(f"floor: only {len(held_out)} held-out functions for {count} samples; the floor is measured with "
                  f"{len(held_out)}, so it is higher than a {count}-sample floor and flatters the samples")
        count = min(count, len(held_out))
        generator = torch.Generator().manual_seed(0)
        sets = [held_out] + [held_out[torch.randint(len(held_out), (count,), generator=generator)] for _ in range(draws - 1)]
    scores = [compare(statistics_of(functions, source_cnn), reference_stats) for functions in sets]
    floor = {key: float(np.mean([score[key] for score in scores])) for key in scores[0]}
    spread = {key: float(np.std([score[key] for score in scores], ddof=1)) for key in scores[0]}
    return floor, spread, count


def worst_ratio(metrics, floor):
    """The headline: the largest metric / floor over w_total and the structure metrics present, and its key."""
    ratios = {key: metrics[key] / floor[key] for key in HEADLINE if key in metrics and floor.get(key)}
    key = max(ratios, key=ratios.get)
    return ratios[key], key


def verdict(value, floor, spread, factor):
    """'met' / 'not met' for value <= factor * floor only where they differ by more than the floor's spread
    (times the factor); else 'within noise'."""
    target = factor * floor
    if value < target - factor * spread:
        return "met"
    if value > target + factor * spread:
        return "not met"
    return "within noise"


TARGETS = {"w_total": 1.5, "spectrum": 1.3, "acf_1": 2.0, "acf_4": 2.0, "acf_16": 2.0, "gradient": 2.0, "residues": 2.0,
           "source_fd": 2.0}
SOURCE_FOUND_TARGET = 0.8    # samples in which the source-CNN finds a source / the same share of real functions
CHECKPOINT_METRICS = METRICS + ("worst_ratio",)   # model.<metric>.pt is kept for the best value of each


def prepare_scoring(data, count, data_dir, device="cpu"):
    """What score() needs: the training set's statistics, the source-CNN (synthetic-volcano only), and
    the real-vs-real floor of `count` functions with its spread."""
    cnn = load_source_cnn(data_dir, device) if data["name"] == "synthetic-volcano" else None
    reference = statistics_of(data["train"], cnn)
    floor, spread, floor_count = real_floor(data, count, reference, cnn)
    return {"cnn": cnn, "reference": reference, "floor": floor, "spread": spread, "count": floor_count}


def score(samples, scoring):
    """The metrics of samples (N, 2, n, n), with the headline worst_ratio (and which metric it is)."""
    metrics = compare(statistics_of(samples, scoring["cnn"]), scoring["reference"])
    metrics["worst_ratio"], metrics["worst_metric"] = worst_ratio(metrics, scoring["floor"])
    return metrics


def verdicts(metrics, scoring):
    """{metric: 'met' | 'not met' | 'within noise'} for the targets: each metric against its factor times
    the floor, the source-detection share against 0.8 times the real share; decided only beyond the spread."""
    floor, spread = scoring["floor"], scoring["spread"]
    out = {key: verdict(metrics[key], floor[key], spread[key], factor) for key, factor in TARGETS.items() if key in metrics}
    if "source_found" in metrics:  # higher is better: compare -found with -0.8 real
        out["source_found"] = verdict(-metrics["source_found"], -floor["source_found"], spread["source_found"],
                                      SOURCE_FOUND_TARGET)
    return out


def score_lines(metrics, scoring):
    """Console lines: every metric beside its floor +- spread, then the headline and the verdicts."""
    floor, spread = scoring["floor"], scoring["spread"]
    keys = [key for key in METRICS + STRUCTURE + ("source_found",) if key in metrics]
    values = ", ".join(f"{key} {metrics[key]:.4g} (floor {floor[key]:.4g} +- {spread[key]:.2g})" for key in keys)
    judged = verdicts(metrics, scoring)
    grouped = {word: [key for key in judged if judged[key] == word] for word in ("met", "not met", "within noise")}
    return [values, f"worst metric/floor {metrics['worst_ratio']:.2f} ({metrics['worst_metric']}); targets "
            + "; ".join(f"{word}: {', '.join(keys)}" for word, keys in grouped.items() if keys)]


# ----------------------------------------------------------------------------------------------
# pictures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_phase_grid(path, functions, titles=None, ncol=8):
    """Phases of functions (N, 2, H, W) as a grid of images on [-pi, pi]."""
    plt = _pyplot()
    count = len(functions)
    rows = (count + ncol - 1) // ncol
    fig, axes = plt.subplots(rows, min(ncol, count), figsize=(2 * min(ncol, count), 2 * rows), squeeze=False)
    phases = phase_of(functions).numpy()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(phases[i], cmap="twilight", vmin=-math.pi, vmax=math.pi, extent=[0, 1, 0, 1])
            if titles:
                ax.set_title(titles[i], fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_noise_pictures(run_dir, noise, generator):
    plt = _pyplot()
    samples = noise.draw(4, generator).cpu()[:, 0].numpy()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for ax, sample in zip(axes, samples):
        image = ax.imshow(sample, extent=[0, 1, 0, 1])
        ax.axis("off")
    fig.colorbar(image, ax=axes.tolist())
    fig.suptitle(f"noise: {noise.kind}" + (f", {noise.kernel} kernel, scale {noise.scale}, nugget {noise.nugget}"
                                             if noise.kind == "rbf" else ""))
    os.makedirs(os.path.join(run_dir, "noise"), exist_ok=True)
    fig.savefig(os.path.join(run_dir, "noise", "noise_samples.png"), dpi=80)
    plt.close(fig)
    points = min(200, noise.n * noise.n)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.matshow(noise.covariance(points).numpy())
    fig.colorbar(image)
    ax.set_title(f"covariance of the first {points} grid points")
    fig.savefig(os.path.join(run_dir, "noise", "noise_sampler_C.png"), dpi=80)
    plt.close(fig)


def save_real_beside_generated(path, real, generated):
    """One row of real functions (held out) above the generated ones, each labelled, so one look tells them apart."""
    functions = torch.cat([real.float().cpu(), generated.float().cpu()])
    return save_phase_grid(path, functions, ["real (held out)"] * len(real) + ["generated"] * len(generated))


def save_statistics_figure(path, scoring, samples, title):
    """Real (training) vs generated: histograms of circular variance and skewness (the reference's metrics),
    of the autocorrelation at 1/64, 4/64 and 16/64 of the domain, of the fringe density and of the residue
    count, and the mean radial power spectra of exp(i phi)."""
    plt = _pyplot()
    real, generated = scoring["reference"], statistics_of(samples, scoring["cnn"])
    panels = [("circular variance", real["variance"], generated["variance"]),
              ("circular skewness", real["skewness"], generated["skewness"]),
              (f"autocorrelation at lag {ACF_LAGS[0]}/64", real["acf"][:, 0], generated["acf"][:, 0]),
              (f"autocorrelation at lag {ACF_LAGS[1]}/64", real["acf"][:, 1], generated["acf"][:, 1]),
              (f"autocorrelation at lag {ACF_LAGS[2]}/64", real["acf"][:, 2], generated["acf"][:, 2]),
              ("fringes per domain length (|grad phi| / 2 pi)", real["gradient"] / (2 * math.pi),
               generated["gradient"] / (2 * math.pi)),
              ("phase residues per function (where the phase jumps)", real["residues"], generated["residues"])]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7))
    for ax, (name, a, b) in zip(axes.flat, panels):
        low, high = np.percentile(np.concatenate([a, b]), [0.5, 99.5])
        bins = np.linspace(low, high, 40)
        ax.hist(a, bins=bins, density=True, alpha=0.5, label=f"real ({len(a)})")
        ax.hist(b, bins=bins, density=True, alpha=0.5, label=f"generated ({len(b)})")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    ax = axes.flat[7]
    ax.semilogy(real["spectrum"].numpy(), label="real")
    ax.semilogy(generated["spectrum"].numpy(), label="generated")
    ax.set_xlabel("|wave vector| (cycles per domain)")
    ax.set_title("radial power spectrum of exp(i phi)", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# configuration: flags, optionally from a JSON experiment file whose keys are the flags' names

def denoising_loss(model, u, noise, sigmas, sigma_data, args, generator):
    """The training loss of a batch u (B, 2, n, n): random flips (--augment), sigma from training_sigmas, z ~ the
    noise, then |n_theta(u + sigma z, sigma) - z|^2 per function (sigma^2-weighted score matching: Song & Ermon
    2019, Eq. 2, lambda = sigma^2), times EDM's weight with --precondition edm (loss_weights)."""
    count, device = len(u), u.device
    if args.augment:
        flips = torch.rand(count, 2, generator=generator).to(device) < 0.5
        u = torch.where(flips[:, 0, None, None, None], u.flip(-1), u)
        u = torch.where(flips[:, 1, None, None, None], u.flip(-2), u)
    sigma = training_sigmas(args, sigmas, count, generator).float().to(device)            # (B,)
    z = noise.draw(count, generator)                                                       # (B, 2, n, n)
    predicted = model(u + sigma.view(-1, 1, 1, 1) * z, sigma)                              # (B, 2, n, n)
    if args.precondition == "edm":
        return (loss_weights(args, sigma, sigma_data) * (predicted - z).pow(2).mean((1, 2, 3))).mean()
    return F.mse_loss(predicted, z)


def save_setup_pictures(run_dir, noise, u, args):
    """noise/*.png (the noise and its covariance) and u_noised.png: one training function u (1, 2, n, n) plus
    noise at 8 of the levels."""
    picture_generator = torch.Generator().manual_seed(args.seed + 2)
    save_noise_pictures(run_dir, noise, picture_generator)
    shown = geometric_sigmas(args.sigma_1, args.sigma_L, 8)
    noised = (u.expand(8, -1, -1, -1) + shown.float().view(-1, 1, 1, 1).to(u.device) * noise.draw(8, picture_generator)).cpu()
    save_phase_grid(os.path.join(run_dir, "u_noised.png"), noised, [f"u + {s:.3g} z" for s in shown.tolist()])


def record_metrics(ema, noise, sigmas, scoring, data, args, run_dir, epoch, device):
    """Sample --Ntest functions from the EMA model and score them; samples/<epoch>.png, stats/<epoch>.png and
    two console lines. Returns (metrics, network evaluations per sample, sampling seconds)."""
    batch_size = sampling_batch_size(args.val_batch_size, device, noise.n)
    samples, evaluations, seconds = generate_functions(ema.model, noise, sigmas, args.Ntest, args.sampler,
                                                       sampler_options(args), batch_size, args.seed + 1, device)
    metrics = score(samples, scoring)
    save_real_beside_generated(os.path.join(run_dir, "samples", f"{epoch}.png"), data["held_out"][:8], samples[:16])
    save_statistics_figure(os.path.join(run_dir, "stats", f"{epoch}.png"), scoring, samples,
                           f"epoch {epoch}: worst metric/floor {metrics['worst_ratio']:.2f} ({metrics['worst_metric']})")
    lines = score_lines(metrics, scoring)
    print(f"epoch {epoch} ({args.sampler}, {evaluations} evaluations, {seconds:.0f} s): {lines[0]}\n  {lines[1]}")
    return metrics, evaluations, seconds


def keep_best(metrics, best, ema, epoch, run_dir, extra):
    """model.<metric>.pt (EMA weights) for every checkpoint metric that improved on best (updated in place)."""
    for key in CHECKPOINT_METRICS:
        if metrics[key] < best[key]:
            best[key] = metrics[key]
            common.save_checkpoint(os.path.join(run_dir, f"model.{key}.pt"),
                                   {"ema": ema.state_dict(), "epoch": epoch, "metrics": metrics, **extra})


def build_parser():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment = parser.add_argument_group("experiment").add_argument
    experiment("--config", default=None, help="JSON experiment file (json/rbf.json, ...): keys are flag names; flags override it")
    experiment("--outdir", default=None, help="run directory (default: $SAVEDIR/<run id>/<experiment name>, SAVEDIR=runs)")
    experiment("--run-id", default=None, help="run id in the $SAVEDIR layout (default: $SLURM_JOB_ID, else the start time)")
    experiment("--exp-name", default=None, help="experiment name in the $SAVEDIR layout (default: the --config file's name)")
    data = parser.add_argument_group("data").add_argument
    data("--dataset", choices=DATASETS, default="synthetic-volcano",
         help="synthetic-volcano (generated, cached), volcano ($DATA_DIR/**/*.int), grf (a known Gaussian random field)")
    data("--data-dir", default="./data", help="cache of generated data; the volcano files when $DATA_DIR is unset")
    data("--n-functions", type=common.positive_int, default=4096, help="functions generated (synthetic-volcano, grf)")
    data("--resolution", type=common.positive_int, default=64, help="grid size the data are resized to (px)")
    data("--crop", type=int, default=0, help="pixels cut from the bottom and right after resizing (the reference: 8)")
    data("--val-size", type=float, default=0.1, help="held-out share (fixed split)")
    noise = parser.add_argument_group("noise").add_argument
    noise("--noise", choices=("white", "rbf"), default="rbf", help="white noise, or a Gaussian random field (--kernel)")
    noise("--kernel", choices=("se", "exponential"), default="se",
          help="se: exp(-d^2/(2 l^2)); exponential: exp(-d/(2 l^2)), the reference's 'RBF'")
    noise("--rbf-scale", type=common.positive_float, default=0.05, help="kernel length l on [0,1)")
    noise("--rbf-eps", type=common.nonnegative_float, default=0.01, help="nugget: eps^2 I added to the covariance")
    noise("--sigma-1", type=common.positive_float, default=30.0, help="largest noise level")
    noise("--sigma-L", type=common.positive_float, default=0.01, help="smallest noise level")
    noise("--L", type=common.positive_int, default=500, help="noise levels (geometric) for training and Langevin")
    model = parser.add_argument_group("model").add_argument
    model("--width", type=common.positive_int, default=32,
          help="FNO channels (32: better than 16 or 48 at equal CPU time on most structure metrics; BENCHMARKS.md)")
    model("--modes", type=common.positive_int, default=12, help="Fourier modes kept per axis")
    model("--layers", type=common.positive_int, default=4, help="FNO blocks (--levels 1)")
    model("--levels", type=common.positive_int, default=1,
          help="1: a plain FNO of --layers blocks; > 1: a U-shaped operator with that many grids, each twice as "
               "coarse with twice the channels (--width at the finest), a 3x3 path in every block")
    model("--local-conv", action=argparse.BooleanOptionalAction, default=False,
          help="a 3x3 convolution beside the spectral one in every block (footprint fixed in domain units)")
    model("--precondition", choices=("none", "edm"), default="edm",
          help="none: the network predicts the noise, loss |n - z|^2; edm: Karras et al.'s c_skip/c_out/c_in "
               "parametrisation and loss weight (1 + sigma^2 / sigma_data^2)")
    model("--no-sigma-embedding", action="store_true",
          help="ablation, the reference's design: no sigma input; the score is the output divided by sigma")
    training = parser.add_argument_group("training").add_argument
    training("--sigma-sampling", choices=("levels", "lognormal"), default="lognormal",
             help="training noise levels: levels = uniform over the L geometric levels (the reference's); lognormal = "
                  "ln sigma ~ N(--sigma-mean, --sigma-std^2) clipped to [sigma_L, sigma_1] (Karras et al. 2022)")
    training("--sigma-mean", type=float, default=-0.5, help="mean of ln sigma (--sigma-sampling lognormal)")
    training("--sigma-std", type=common.positive_float, default=1.5, help="std of ln sigma (--sigma-sampling lognormal)")
    training("--epochs", type=common.positive_int, default=None,
             help="passes over the training functions (default: none, --max-minutes ends training)")
    training("--max-minutes", type=common.nonnegative_float, default=9.0,
             help="stop training after this much training time, sample scoring left out (9: about 13 min end to end "
                  "on 2 CPU cores; 0 = no time limit, needs --epochs)")
    training("--batch-size", type=common.positive_int, default=16, help="training batch size")
    training("--lr", type=common.positive_float, default=1e-3, help="Adam learning rate")
    training("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (with warm-up)")
    training("--augment", action=argparse.BooleanOptionalAction, default=True, help="random horizontal/vertical flips")
    training("--seed", type=int, default=0, help="random seed (same seed on CPU -> same numbers)")
    sampling = parser.add_argument_group("sampling").add_argument
    sampling("--sampler", choices=sorted(SAMPLERS), default="heun",
             help="heun: probability-flow ODE, 2*steps-1 evaluations; langevin: the reference's, L*T evaluations")
    sampling("--steps", type=common.positive_int, default=25, help="Heun steps (--sampler heun)")
    sampling("--churn", type=common.nonnegative_float, default=0.0,
             help="Heun stochastic churn (Karras et al. S_churn; 0 = the deterministic probability-flow ODE, best of 0/1 "
                  "on a validation seed of the EDM model; the old noise-predicting model needed 3)")
    sampling("--T", type=common.positive_int, default=3, help="Langevin steps per level (--sampler langevin)")
    sampling("--epsilon", type=common.positive_float, default=6e-6, help="Langevin step: alpha_i = epsilon sigma_i^2 / sigma_L^2")
    evaluation = parser.add_argument_group("evaluation").add_argument
    evaluation("--record-interval", type=common.positive_int, default=8, help="epochs between sample metrics (and at the end)")
    evaluation("--Ntest", type=common.positive_int, default=256, help="samples for the metrics")
    evaluation("--val-batch-size", type=common.positive_int, default=None,
               help=VAL_BATCH_HELP)
    system = parser.add_argument_group("system").add_argument
    system("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    system("--threads", type=common.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    system("--resume", action="store_true", help="continue the run in the run directory from its model.pt")
    system("--log-every", type=common.positive_int, default=50, help="steps between metrics.jsonl lines")
    system("--wandb", choices=("off", "offline", "online"), default="off", help="Weights & Biases mode")
    system("--no-progress", action="store_true", help="no tqdm bars (batch jobs)")
    return parser


def read_experiment_file(path, parser):
    """The JSON file's settings as argparse defaults; unknown keys, bad JSON or bad values are one UserError."""
    try:
        with open(path) as file:
            settings = json.load(file)
    except OSError as error:
        raise UserError(f"--config {path}: {error.strerror}")
    except json.JSONDecodeError as error:
        raise UserError(f"--config {path} is not valid JSON ({error.msg} at line {error.lineno})")
    if not isinstance(settings, dict):
        raise UserError(f"--config {path} must hold a JSON object of flag names and values")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(settings) - set(actions) - {"config", "help"})
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown} (keys are flag names, e.g. sigma_1, batch_size)")
    for key, value in settings.items():
        action = actions[key]
        if action.type is not None and value is not None:
            try:
                settings[key] = action.type(str(value))
            except ValueError as error:
                raise UserError(f"--config {path}: {key} = {value!r}: {error}")
        if action.choices is not None and settings[key] not in action.choices:
            raise UserError(f"--config {path}: {key} must be one of {list(action.choices)}, got {value!r}")
    return settings


def parse_args(argv):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_experiment_file(known.config, parser))
    args = parser.parse_args(argv)
    if not args.sigma_1 > args.sigma_L:
        parser.error(f"need --sigma-1 > --sigma-L, got {args.sigma_1} and {args.sigma_L}")
    if not 0 < args.val_size < 1:
        parser.error(f"--val-size must be in (0, 1), got {args.val_size}")
    if not 0 <= args.crop < args.resolution // 2:
        parser.error(f"--crop must be in [0, resolution/2), got {args.crop}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not args.max_minutes and args.epochs is None:
        parser.error("--max-minutes 0 (no time limit) needs --epochs")
    return args


def run_directory(args):
    if args.outdir:
        return args.outdir
    run_id = args.run_id or os.environ.get("SLURM_JOB_ID") or time.strftime("%Y%m%d-%H%M%S")
    name = args.exp_name or (os.path.splitext(os.path.basename(args.config))[0] if args.config else "default")
    return os.path.join(os.environ.get("SAVEDIR", "runs"), run_id, name)


# ----------------------------------------------------------------------------------------------
# training

def resume_from(checkpoint_path, config, model, ema, optimizer, generator):
    """Restore a run from its model.pt (model, EMA, optimiser, generator in place); returns its progress
    (epoch, batch_index, step, elapsed, best). A run with other settings is refused."""
    state = common.load_checkpoint(checkpoint_path, script=SCRIPT, kinds={KIND})
    defaults = build_parser()        # a setting added since the run started has its default there
    changed = [key for key in RUN_IDENTITY if state["config"].get(key, defaults.get_default(key)) != config[key]]
    if changed:
        raise UserError(f"{checkpoint_path} was trained with other settings ({', '.join(changed)}); use another --outdir")
    common.restore_training_state(state, checkpoint_path, model, ema, optimizer, generator)
    return {key: state[key] for key in ("epoch", "batch_index", "step", "elapsed", "best")}


def train_epoch(model, ema, optimizer, train, noise, sigmas, sigma_data, generator, progress, args, logger, stop, started,
                checkpoint_path):
    """The rest of epoch progress['epoch'] from batch progress['batch_index'], in a batch order fixed by the seed
    and the epoch; progress['step'] and ['batch_index'] advance, and at the epoch's end ['epoch'] does (and
    ['batch_index'] is reset). Returns (the last loss, why it stopped early: None, 'signal' or 'time', the
    latter when the training clock, started at `started`, passes --max-minutes)."""
    model.train()
    epoch, steps_per_epoch = progress["epoch"], (len(train) + args.batch_size - 1) // args.batch_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(train.device)
    bar = tqdm(range(progress["batch_index"], steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs or '?'}",
               disable=args.no_progress, mininterval=1.0, leave=False)
    window_start, window_step, last_loss = time.time(), progress["step"], float("nan")
    for batch_index in bar:
        u = train[order[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]]   # (B, 2, n, n)
        loss = denoising_loss(model, u, noise, sigmas, sigma_data, args, generator)
        last_loss = common.finite_loss(loss, f"step {progress['step']}", checkpoint_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        step = progress["step"] = progress["step"] + 1
        progress["batch_index"] = batch_index + 1
        bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        if step % args.log_every == 0:
            rate = (step - window_step) / max(time.time() - window_start, 1e-9)  # steps/s since the last line
            logger.log({"train/loss": last_loss, "progress/epoch": epoch + (batch_index + 1) / steps_per_epoch,
                        "system/images_per_second": rate * args.batch_size}, step=step)
            window_start, window_step = time.time(), step
        if stop.received:
            return last_loss, "signal"
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            return last_loss, "time"
    progress["epoch"], progress["batch_index"] = epoch + 1, 0
    return last_loss, None


def prepare_data(args, device):
    """(the functions' dict, the Gaussian-random-field noise, the noise levels sigma (L,) float64 on the CPU, the
    scoring dict with the real-vs-real floors, printed)."""
    data = load_functions(args.dataset, args.resolution, args.crop, args.n_functions, args.val_size, args.data_dir, args.seed)
    noise = GaussianNoise(data["train"].shape[-1], args.noise, args.kernel, args.rbf_scale, args.rbf_eps, device)
    if noise.clipped_share > 1e-6:
        print(f"noise: the circulant embedding clipped {noise.clipped_share:.2e} of its spectrum (negative eigenvalues)")
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.L)
    scoring = prepare_scoring(data, args.Ntest, args.data_dir, device)
    floor = scoring["floor"]
    print(f"real-vs-real floor ({scoring['count']} real functions not trained on vs train, mean +- std of 4 sets): "
          + ", ".join(f"{key} {floor[key]:.4g} +- {scoring['spread'][key]:.2g}" for key in floor))
    return data, noise, sigmas, scoring


def build_model(args, grid, sigma_data, device):
    """(model_args, the ScoreFNO, its EMA, Adam), the weights drawn from --seed."""
    torch.manual_seed(args.seed)
    model_args = model_args_of(args, grid, sigma_data)
    model = ScoreFNO(**model_args).to(device)
    return model_args, model, common.EMA(model, args.ema_decay), torch.optim.Adam(model.parameters(), lr=args.lr)


def open_run(args, run_dir, config, progress, model, ema, optimizer, generator):
    """(progress, the RunLogger): a new run's progress, or with --resume the stopped run's restored from its
    model.pt into model, EMA, optimiser and generator; config.json written, the logs cut back to the checkpoint."""
    checkpoint_path = os.path.join(run_dir, "model.pt")
    if os.path.isfile(checkpoint_path) and not args.resume:
        raise UserError(f"{checkpoint_path} exists; pass --resume to continue that run, or pick another --outdir")
    if args.resume:
        progress = resume_from(checkpoint_path, config, model, ema, optimizer, generator)
        print(f"resuming {run_dir} at epoch {progress['epoch']}, step {progress['step']}")
    print(f"run directory: {run_dir}")
    common.write_json(os.path.join(run_dir, "config.json"), config)
    logger = common.RunLogger(run_dir, config, args.wandb, name=os.path.basename(run_dir), resume=args.resume)
    if args.resume:
        logger.truncate_after(progress["step"])  # the steps after the checkpoint are logged again by this run
    return progress, logger


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return evaluate(argv[1:])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    run_dir = common.prepare_outdir(run_directory(args))
    checkpoint_path = os.path.join(run_dir, "model.pt")

    # data, noise, noise levels, the real-vs-real floors
    data, noise, sigmas, scoring = prepare_data(args, device)
    train = data["train"].to(device)
    size = train.shape[-1]

    # model, optimiser, EMA
    sigma_data = round(float(data['train'].std()), 4)                    # per-channel std of the training functions
    model_args, model, ema, optimizer = build_model(args, size, sigma_data, device)
    print(f"score FNO: {common.count_parameters(model):,} parameters; sigma embedding {'on' if model_args['sigma_embedding'] else 'OFF'}")
    config = {**vars(args), "run_dir": run_dir, "dataset_used": data["name"], "train_size": len(train),
              "held_out_size": len(data["held_out"]), "grid": size, "parameters": common.count_parameters(model)}
    meta = common.checkpoint_meta(SCRIPT, KIND, model_args=model_args, grid=size)

    generator = torch.Generator().manual_seed(args.seed)   # all training randomness; checkpointed
    steps_per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    progress = {"epoch": 0, "batch_index": 0, "step": 0, "elapsed": 0.0,      # saved with every checkpoint
                "best": {key: float("inf") for key in CHECKPOINT_METRICS}}
    progress, logger = open_run(args, run_dir, config, progress, model, ema, optimizer, generator)
    if not args.resume:
        save_setup_pictures(run_dir, noise, train[:1], args)

    def save(path):
        common.save_checkpoint(path, {**common.training_state(model, ema, optimizer, generator), **progress,
                                      "config": config, "meta": meta})

    def record():
        metrics, evaluations, seconds = record_metrics(ema, noise, sigmas, scoring, data, args, run_dir,
                                                       progress["epoch"], device)
        keep_best(metrics, progress["best"], ema, progress["epoch"], run_dir, {"config": config, "meta": meta})
        logger.log({**{f"val/{key}": value for key, value in metrics.items() if key != "worst_metric"},
                    "val/sampling_s": seconds, "val/evaluations": evaluations, "progress/epoch": progress["epoch"]},
                   step=progress["step"])
        return metrics, evaluations, seconds

    # training loop: denoising score matching (Song & Ermon 2019, Eq. 2), with EDM's weight by default (loss_weights)
    stop = common.StopSignal()
    started = time.time() - progress["elapsed"]
    metrics = None
    try:
        while args.epochs is None or progress["epoch"] < args.epochs:
            last_loss, stopped = train_epoch(model, ema, optimizer, train, noise, sigmas, sigma_data, generator, progress,
                                             args, logger, stop, started, checkpoint_path)
            progress["elapsed"] = elapsed = time.time() - started
            if stopped == "signal":
                save(checkpoint_path)
                print(f"{stop.received} received: saved {checkpoint_path} at step {progress['step']}; rerun with --resume")
                logger.finish()  # the W&B run is continued by the resumed run (same id)
                return None
            epoch, batch_index = progress["epoch"], progress["batch_index"]
            total = args.epochs or "?"
            label = (f"epoch {epoch + 1}/{total} stopped after {batch_index}/{steps_per_epoch} steps" if batch_index
                     else f"epoch {epoch}/{total}")   # --max-minutes stops inside an epoch
            print(f"{label}: loss {last_loss:.4f} ({elapsed:.0f} s)")
            finished = ((args.epochs is not None and epoch >= args.epochs)
                        or (bool(args.max_minutes) and elapsed > 60 * args.max_minutes))
            if epoch % args.record_interval == 0 or finished:
                record_started = time.time()
                metrics, evaluations, seconds = record()
                started += time.time() - record_started  # the training clock (train_time_s, --max-minutes) leaves it out
            save(checkpoint_path)
            if finished:
                break
    finally:
        stop.close()

    # results: the final EMA model's metrics beside their real-vs-real floors
    if metrics is None:
        metrics, evaluations, seconds = record()
    return write_results(run_dir, data, progress, metrics, evaluations, seconds, scoring, args, model_args, logger)


def write_results(run_dir, data, progress, metrics, evaluations, seconds, scoring, args, model_args, logger):
    """results.json: the final EMA model's metrics (sampled in `seconds` at `evaluations` network evaluations per
    sample) beside their real-vs-real floors and the verdicts; the metrics also as W&B's summary."""
    results = {"run_dir": run_dir, "dataset": data["name"], "grid": data["train"].shape[-1], "epochs": progress["epoch"],
               "steps": progress["step"], "train_time_s": progress["elapsed"], **metrics, "floor": scoring["floor"],
               "floor_spread": scoring["spread"], "floor_count": scoring["count"], "verdicts": verdicts(metrics, scoring),
               "best": progress["best"], "sampler": args.sampler, "sampler_options": sampler_options(args),
               "evaluations_per_sample": evaluations, "Ntest": args.Ntest, "sampling_s": seconds, "noise": args.noise,
               "kernel": args.kernel, "sigma_embedding": model_args["sigma_embedding"]}
    common.write_json(os.path.join(run_dir, "results.json"), results)
    logger.finish({f"final/{key}": value for key, value in metrics.items() if key != "worst_metric"})
    print(f"wrote {os.path.join(run_dir, 'results.json')}")
    return results


# ----------------------------------------------------------------------------------------------
# evaluation of a finished run: generate | plot | superres

def load_run(exp_dir, checkpoint, device):
    """The run's settings (argparse namespace) and its EMA model, from config.json and a checkpoint in it."""
    config_path = os.path.join(exp_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{exp_dir} has no config.json; is it a no_diffusion.py run directory?")
    with open(config_path) as file:
        config = json.load(file)
    path = checkpoint if os.path.isabs(checkpoint) else os.path.join(exp_dir, checkpoint)
    state = common.load_checkpoint(path, script=SCRIPT, kinds={KIND})
    model = ScoreFNO(**state["meta"]["model_args"])
    common.load_model_state(model, state["ema"]["model"], path)
    return argparse.Namespace(**config), model.to(device).eval()


def evaluate(argv):
    parser = common.ArgumentParser(prog="no_diffusion.py eval", description="Evaluate a trained run.")
    parser.add_argument("--exp-dir", required=True, help="the run directory (holds config.json and checkpoints)")
    parser.add_argument("--checkpoint", default="model.w_total.pt", help="checkpoint file in --exp-dir (or a path)")
    parser.add_argument("--mode", choices=("generate", "plot", "superres"), default="generate",
                        help="generate: samples + statistics; plot: histograms; superres: sample at 2x resolution")
    parser.add_argument("--Ntest", type=common.positive_int, default=1024, help="samples to generate")
    parser.add_argument("--val-batch-size", type=common.positive_int, default=None,
                        help=VAL_BATCH_HELP)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampler (default: the run's)")
    parser.add_argument("--steps", type=common.positive_int, default=None, help="Heun steps (default: the run's)")
    parser.add_argument("--T", type=common.positive_int, default=None, help="Langevin steps per level (default: the run's)")
    parser.add_argument("--churn", type=common.nonnegative_float, default=None, help="Heun churn (default: the run's)")
    parser.add_argument("--sigma-max", type=common.positive_float, default=None,
                        help="Heun's first noise level, where sampling starts (default: the run's --sigma-1)")
    parser.add_argument("--rho", type=common.positive_float, default=None,
                        help="exponent of Heun's level spacing (Karras et al. 2022, Eq. 5; default 7)")
    parser.add_argument("--scale", type=common.positive_int, default=2, help="resolution factor for superres")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sampler's noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--threads", type=common.positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    eval_args = parser.parse_args(argv)
    if eval_args.threads:
        torch.set_num_threads(eval_args.threads)
    device = common.pick_device(eval_args.device)
    outdir = os.path.join(eval_args.exp_dir, "eval")
    stats_path = os.path.join(outdir, "statistics.pt")
    if eval_args.mode == "plot" and not os.path.isfile(stats_path):
        raise UserError(f"{stats_path} does not exist; run --mode generate first")
    args, model = load_run(eval_args.exp_dir, eval_args.checkpoint, device)
    for key in ("sampler", "steps", "T", "churn", "sigma_max", "rho"):
        if getattr(eval_args, key) is not None:
            setattr(args, key, getattr(eval_args, key))
    if (eval_args.sigma_max or eval_args.rho) and args.sampler != "heun":
        raise UserError("--sigma-max and --rho set the Heun sampler's levels; this run samples with --sampler "
                        f"{args.sampler}")
    if eval_args.sigma_max is not None and not eval_args.sigma_max > args.sigma_L:
        raise UserError(f"--sigma-max must exceed the run's --sigma-L {args.sigma_L}, got {eval_args.sigma_max}")
    scale = eval_args.scale if eval_args.mode == "superres" else 1
    data = load_functions(args.dataset, args.resolution * scale, args.crop * scale, args.n_functions, args.val_size,
                          args.data_dir, args.seed)
    size = data["train"].shape[-1]
    if eval_args.mode == "plot":
        stats = torch.load(stats_path, weights_only=True)
        scoring = prepare_scoring(data, len(stats["samples"]), args.data_dir)
        path = save_statistics_figure(os.path.join(outdir, "histograms.png"), scoring, stats["samples"].float(), stats["title"])
        print(f"wrote {path}")
        return path
    noise = GaussianNoise(size, args.noise, args.kernel, args.rbf_scale, args.rbf_eps, device)
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.L)
    samples, evaluations, seconds = generate_functions(model, noise, sigmas, eval_args.Ntest, args.sampler, sampler_options(args),
                                                       sampling_batch_size(eval_args.val_batch_size, device, size),
                                                       eval_args.seed, device,
                                                       progress=not eval_args.no_progress)
    scoring = prepare_scoring(data, eval_args.Ntest, args.data_dir)
    metrics = score(samples, scoring)
    results = {"mode": eval_args.mode, "checkpoint": eval_args.checkpoint, "grid": size, "Ntest": eval_args.Ntest,
               **metrics, "floor": scoring["floor"], "floor_spread": scoring["spread"], "floor_count": scoring["count"],
               "verdicts": verdicts(metrics, scoring), "sampler": args.sampler, "sampler_options": sampler_options(args),
               "evaluations_per_sample": evaluations, "sampling_s": seconds}
    os.makedirs(outdir, exist_ok=True)
    save_real_beside_generated(os.path.join(outdir, f"{eval_args.mode}_samples.png"), data["held_out"][:8], samples[:16])
    if eval_args.mode == "generate":
        torch.save({"samples": samples.half(), "title": f"{eval_args.checkpoint}, {size} px: worst metric/floor "
                    f"{metrics['worst_ratio']:.2f} ({metrics['worst_metric']})"}, stats_path)
    else:
        native_path = os.path.join(outdir, "generate.json")
        if os.path.isfile(native_path):
            with open(native_path) as file:
                native = json.load(file)
            results["native_w_total"] = native["w_total"]
            results["w_total_ratio_to_native"] = metrics["w_total"] / native["w_total"]
            results["native_worst_ratio"] = native.get("worst_ratio")
    common.write_json(os.path.join(outdir, f"{eval_args.mode}.json"), results)
    lines = score_lines(metrics, scoring)
    print(f"{eval_args.mode} at {size} px, {eval_args.Ntest} samples ({args.sampler}, {evaluations} evaluations, "
          f"{seconds:.0f} s): {lines[0]}\n  {lines[1]}")
    return results


if __name__ == "__main__":
    common.run_main(main)
