"""MNIST1D diffusion: does teaching one network both directions help?

One denoiser takes a direction flag z: z=0 "forward" (noisy -> clean, the diffusion denoiser) and
z=1 "inverse" (clean -> the digit's prime inverse, a fixed transform per digit, see PRIME_INVERSES).
Eight configurations = {mse, kl} loss x {gaussian, convex} noise x {implicit, semi-implicit} training.

    python mnist1d_semi_implicit.py --outdir runs/mnist1d                 # all 8 configs, 4-16 min on 2 CPU cores
    python mnist1d_semi_implicit.py --outdir runs/mnist1d --seeds 3       # every config over 3 seeds, mean +- std
    python mnist1d_semi_implicit.py --outdir runs/one --configs mse-convex-semi-implicit --epochs 60
    python mnist1d_semi_implicit.py --outdir runs/mnist1d --resume        # continue after a kill or preemption
    python mnist1d_semi_implicit.py --check                               # pre-flight, seconds, before sbatch
    python mnist1d_semi_implicit.py report --outdir runs/mnist1d          # merge the finished configs (SLURM array)

Writes into --outdir: config.json, metrics.jsonl, runs/<config>-seed<k>/{checkpoint.pt,result.json},
results.json (every metric and curve), report.md, and PNG plots (loss_curves, loss_components,
prime_inverse, forward_mse_vs_t, samples_<config>).
"""
import argparse
import fcntl
import json
import math
import os
import pickle
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "mnist1d_semi_implicit"
LOSSES, NOISES, TRAININGS = ("mse", "kl"), ("gaussian", "convex"), ("implicit", "semi-implicit")
ALL_CONFIGS = [f"{loss}-{noise}-{training}" for loss in LOSSES for noise in NOISES for training in TRAININGS]
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the "no label" token for classifier-free guidance
# Every flag that changes a config's result: --resume continues a checkpoint, or reuses a finished
# config's result.json, only when all of them match (the seed is in the run directory's name).
RUN_IDENTITY = ("epochs", "batch_size", "lr", "warmup_steps", "grad_clip", "width", "T", "schedule", "label_dropout",
                "weight_forward", "weight_inverse", "weight_rt_fi", "weight_rt_if", "ema_decay", "eval_strata",
                "sampler", "sample_steps", "guidance_scale", "guidance_interval", "samples_per_class", "dataset_seed")

# ----------------------------------------------------------------------------------------------
# data

def load_mnist1d(data_dir, seed=42):
    """MNIST1D (Greydanus 2020): 4000 train / 1000 test signals of length 40, 10 classes.

    Generated offline by the mnist1d package and cached as a pickle in data_dir. The package's
    set_seed reseeds the global `random` and NumPy states; they are restored here.
    Returns float32 tensors x (4000, 40), x_test (1000, 40) and long tensors y, y_test."""
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as error:
        raise common.UserError(f"cannot create --data-dir {data_dir}: {error.strerror}")
    path = os.path.join(data_dir, f"mnist1d_seed{seed}.pkl")
    data = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as file:
                data = pickle.load(file)
        except Exception:
            print(f"cached MNIST1D at {path} is unreadable; regenerating it")
    if data is None:
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.seed = seed
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        data = {k: data[k] for k in ("x", "y", "x_test", "y_test", "t")}
        try:
            common.atomic_write(path, lambda file: pickle.dump(data, file), mode="wb")
        except OSError as error:
            raise common.UserError(f"cannot write the MNIST1D cache into --data-dir {data_dir}: {error.strerror}")
    return {
        "x": torch.tensor(data["x"], dtype=torch.float32),
        "y": torch.tensor(data["y"], dtype=torch.long),
        "x_test": torch.tensor(data["x_test"], dtype=torch.float32),
        "y_test": torch.tensor(data["y_test"], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------
# The prime inverse: one deterministic transform per digit (0, 1 and 9 fixed by the user).
# x: (B, 40). docs/mnist1d.md has this table with invertibility.
POSITION = torch.arange(40, dtype=torch.float32)
PRIME_INVERSES = {
    0: ("-x", lambda x: -x),
    1: ("roll(x, 10)", lambda x: torch.roll(x, 10, dims=-1)),
    2: ("flip(x) (time reversal)", lambda x: torch.flip(x, dims=[-1])),
    3: ("x/2 + 1", lambda x: x / 2 + 1),
    4: ("tanh(x)", torch.tanh),
    5: ("sign(x) sqrt|x|", lambda x: torch.sign(x) * x.abs().sqrt()),
    6: ("softplus(x)", F.softplus),
    7: ("-flip(x)", lambda x: -torch.flip(x, dims=[-1])),
    8: ("x + sin(2 pi i / 40)", lambda x: x + torch.sin(2 * math.pi * POSITION.to(x.device) / 40)),
    9: ("cos(x pi / 5) + 1", lambda x: torch.cos(x * math.pi / 5) + 1),
}


def prime_inverse(x, y):
    """Each sample transformed by the prime inverse of its own label. x: (B, 40), y: (B,) -> (B, 40)."""
    out = torch.empty_like(x)
    for digit, (_, transform) in PRIME_INVERSES.items():
        mask = y == digit
        if mask.any():
            out[mask] = transform(x[mask])
    return out


def wandb_status():
    """One line saying whether W&B is installed and has a key (environment or `wandb login`)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "wandb not installed"
    if os.environ.get("WANDB_API_KEY"):
        return "W&B key found in WANDB_API_KEY"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read():
        return "W&B key found from `wandb login`"
    return "no W&B key (offline mode works; for online set WANDB_API_KEY or run `wandb login`)"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data").add_argument
    data("--data-dir", default="./data", help="where the generated MNIST1D pickle and the classifier are cached")
    data("--dataset-seed", type=int, default=42, help="seed of the MNIST1D generator (42 = the standard dataset)")
    model = p.add_argument_group("model").add_argument
    model("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS, metavar="CONFIG",
          help=f"configurations to run, of: {' '.join(ALL_CONFIGS)}")
    model("--width", type=common.positive_int, default=16, help="UNet base channels (levels: w, 2w, 2w)")
    model("--T", type=common.positive_int, default=1000, help="diffusion timesteps")
    model("--schedule", default="cosine", choices=["cosine", "linear"],
          help="alpha_bar schedule of the gaussian noise (linear = DDPM betas 1e-4..2e-2 at T = 1000, "
               "scaled by 1000/T)")
    model("--label-dropout", type=float, default=0.2,
          help="probability of replacing the class label by the null label in z=0 passes (classifier-free "
               "guidance); must be > 0: the forward metrics and guidance use the null label")
    training = p.add_argument_group("training").add_argument
    training("--epochs", type=common.positive_int, default=40, help="training epochs per configuration")
    training("--batch-size", type=common.positive_int, default=256, help="training batch size")
    training("--lr", type=common.positive_float, default=2e-3, help="peak AdamW learning rate (cosine decay after warm-up)")
    training("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps")
    training("--grad-clip", type=common.positive_float, default=1.0, help="gradient-norm clipping threshold")
    training("--weight-forward", type=common.nonnegative_float, default=1.0, help="weight of the forward loss")
    training("--weight-inverse", type=common.nonnegative_float, default=1.0, help="weight of the inverse loss (semi-implicit)")
    training("--weight-rt-fi", type=common.nonnegative_float, default=0.5, help="weight of the forward->inverse round trip (semi-implicit)")
    training("--weight-rt-if", type=common.nonnegative_float, default=0.5, help="weight of the inverse->forward round trip (semi-implicit)")
    training("--ema-decay", type=float, default=0.995, help="EMA decay of the weights used for evaluation")
    training("--seed", type=int, default=0, help="first training seed")
    training("--seeds", type=common.positive_int, default=1, help="repeat every config over this many seeds (seed, seed+1, ...)")
    sampling = p.add_argument_group("sampling").add_argument
    sampling("--sampler", default="dpmpp", choices=sorted(common.SAMPLERS), help="sampler for generation")
    sampling("--sample-steps", type=common.positive_int, default=50, help="network evaluations per generated batch")
    sampling("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional only)")
    sampling("--guidance-interval", type=common.noise_interval, default=None, metavar="LO,HI",
             help="guide only at noise levels sigma = b_t / a_t in [LO, HI] (Kynkaanniemi et al. 2024; "
                  "default: every step)")
    evaluation = p.add_argument_group("evaluation").add_argument
    evaluation("--eval-strata", type=common.positive_int, default=20,
               help="timestep strata for the test metrics (one random t per stratum and test signal)")
    evaluation("--samples-per-class", type=common.positive_int, default=100, help="generated signals per digit for FD and accuracy")
    system = p.add_argument_group("system").add_argument
    system("--outdir", default="runs/mnist1d", help="directory for everything the run writes")
    system("--resume", action="store_true", help="continue the run in --outdir from its checkpoints")
    system("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    system("--compile", action="store_true", help="torch.compile the model (GPU)")
    system("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    system("--wandb", default="off", choices=["off", "offline", "online"], help="Weights & Biases logging")
    system("--wandb-project", default="diffusion-lab-mnist1d", help="W&B project (or set WANDB_PROJECT)")
    system("--no-progress", action="store_true", help="no tqdm progress bars")
    system("--check", action="store_true", help="pre-flight: imports, W&B login, dataset, device, one step; then exit")
    args = p.parse_args(argv)
    # every flag is checked here, before any data or training: one line, exit 2
    if not 0 < args.label_dropout < 1:
        p.error("--label-dropout must be in (0, 1): with 0 the null label is never trained, and the forward "
                "metrics and guidance use it")
    if not 0 < args.ema_decay < 1:
        p.error("--ema-decay must be in (0, 1)")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not math.isfinite(args.guidance_scale):
        p.error(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.seed < 0 or args.dataset_seed < 0:
        p.error("--seed and --dataset-seed must be >= 0")
    if args.eval_strata >= args.T:
        p.error("--eval-strata must be smaller than --T")
    if args.sample_steps > args.T:
        p.error("--sample-steps must be at most --T")
    if args.weight_forward == 0:
        p.error("--weight-forward must be > 0: the forward (denoising) loss is what every config trains")
    return args


# ----------------------------------------------------------------------------------------------
# model

def ResBlock1d(in_channels, out_channels, emb_dim, groups=8):
    """The 1-D ResBlock (the name UNet1d and its users know)."""
    return common.ResBlock(in_channels, out_channels, emb_dim, groups, dims=1)


class UNet1d(nn.Module):
    """A small 1-D UNet for signals (B, C, L), L divisible by 2**(len(channels)-1).

    Conditioned on an embedding (B, emb_dim) that the caller builds (time, direction, class, ...)."""

    def __init__(self, in_channels=1, out_channels=1, channels=(64, 128, 128), emb_dim=128):
        super().__init__()
        self.stem = nn.Conv1d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        widths = [channels[0]] + list(channels)
        for i in range(len(channels)):
            self.down.append(ResBlock1d(widths[i], widths[i + 1], emb_dim))
        self.mid = ResBlock1d(channels[-1], channels[-1], emb_dim)
        for i in reversed(range(len(channels))):
            self.up.append(ResBlock1d(widths[i + 1] * 2, widths[i], emb_dim))
        self.head = nn.Sequential(nn.GroupNorm(8, channels[0]), nn.SiLU(), nn.Conv1d(channels[0], out_channels, 3, padding=1))
        self.levels = len(channels)

    def forward(self, x, emb):  # x: (B, C, L), emb: (B, emb_dim)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < self.levels - 1:
                h = F.avg_pool1d(h, 2)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)


class Denoiser(nn.Module):
    """x0-prediction UNet conditioned on time t, direction z (0 forward, 1 inverse) and an optional
    class label (NULL_LABEL = none). (B, 40) -> (B, 40).

    The forward direction is preconditioned as in EDM (Karras et al. 2022, Eq. 7 and Table 1) for
    x_t = a x0 + b eps, i.e. sigma = b / a:  x0_hat = c_skip x_t + c_out F(c_in x_t) with
    c_in = 1 / sqrt(b^2 + a^2 s^2), c_skip = s^2 a c_in^2, c_out = b s c_in (s = data std), all finite
    also where a = 0. At small noise x0_hat is then close to the input without the network having to
    copy it, which keeps the variational-bound (KL) terms of small t finite. The inverse direction
    maps clean input to its target directly: x0_hat = F(x)."""

    def __init__(self, process, width=16, emb_dim=128, sigma_data=1.0):
        super().__init__()
        self.emb_dim, self.sigma_data = emb_dim, sigma_data
        self.register_buffer("a", process.a.float(), persistent=False)  # (T+1,)
        self.register_buffer("b", process.b.float(), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.direction = nn.Embedding(2, emb_dim)
        self.label = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.unet = UNet1d(1, 1, (width, 2 * width, 2 * width), emb_dim)

    def forward(self, x, t, z, y):  # x: (B, 40), t, z, y: (B,)
        emb = self.time_mlp(common.timestep_embedding(t, self.emb_dim)) + self.direction(z) + self.label(y)
        a, b, s = self.a[t][:, None], self.b[t][:, None], self.sigma_data
        c_in = (b**2 + (a * s) ** 2).rsqrt()
        is_forward = (z == 0)[:, None]
        out = self.unet(torch.where(is_forward, c_in * x, x)[:, None], emb)[:, 0]
        return torch.where(is_forward, s**2 * a * c_in**2 * x + b * s * c_in * out, out)


class Classifier(nn.Module):
    """Small 1-D CNN for MNIST1D; `features` (B, 128) feed the Fréchet distance."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 64, 5, padding=2, stride=2), nn.ReLU(),
            nn.Conv1d(64, 64, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 10, 128), nn.ReLU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):  # (B, 40) -> (B, 128)
        return self.body(x[:, None])

    def forward(self, x):
        return self.head(self.features(x))


def load_or_train_classifier(data, data_dir, dataset_seed, device):
    """Train the evaluation classifier once on the real training signals; cache it in data_dir."""
    path = os.path.join(data_dir, f"mnist1d_classifier_seed{dataset_seed}.pt")
    classifier = Classifier()
    if os.path.exists(path):
        state = common.load_checkpoint(path, script=SCRIPT, kinds={"mnist1d-classifier"})
        common.load_model_state(classifier, state["model"], path)
        return classifier.to(device).eval(), state["test_accuracy"]
    print(f"training the MNIST1D evaluation classifier once (cached at {path})")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    classifier = Classifier()
    epochs, batch_size = 30, 128
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * math.ceil(len(data["x"]) / batch_size))
    x, y = data["x"], data["y"]
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            batch = order[i:i + batch_size]
            shifted = torch.roll(x[batch], int(torch.randint(-2, 3, (1,), generator=generator)), dims=1)  # shift augmentation
            loss = F.cross_entropy(classifier(shifted), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    with torch.no_grad():
        test_accuracy = (classifier(data["x_test"]).argmax(1) == data["y_test"]).float().mean().item()
    print(f"classifier test accuracy {test_accuracy:.3f}")
    common.save_checkpoint(path, {"model": classifier.state_dict(), "test_accuracy": test_accuracy,
                                  "meta": common.checkpoint_meta(SCRIPT, "mnist1d-classifier")})
    return classifier.to(device), test_accuracy


# ----------------------------------------------------------------------------------------------
# losses

def vlb_weights(process):
    """Per-timestep weight w_t of the variational bound in x0-space, shape (T+1,), w_0 unused.

    For t >= 2, KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) with p sharing q's variance and x0 -> x0_hat
    is w_t * ||x0 - x0_hat||^2 with w_t = (SNR(t-1) - SNR(t)) / 2 (VDM, Eq. 13 in discrete time).
    For t = 1 the term is the decoder -log N(x0; x0_hat, b_1^2): weight 1 / (2 b_1^2)."""
    snr = process.snr()
    weights = torch.zeros_like(snr)
    weights[2:] = (snr[1:-1] - snr[2:]) / 2
    weights[1] = 1 / (2 * process.b[1] ** 2)
    return weights


def vlb_terms(process, x0, x0_pred, t, decoder_constant=True):
    """L_{t-1} per sample in nats (summed over all but the batch dim), shape (B,).

    t >= 2: the Gaussian KL above; t = 1: the decoder negative log-likelihood, with its constant
    0.5 * dims * log(2 pi b_1^2) unless decoder_constant=False (a training loss has no use for it).
    Differentiable in x0_pred. x0, x0_pred: (B, ...); t: (B,) long in 1..T."""
    weights = common.at_timestep(vlb_weights(process), t, x0).flatten()
    squared_error = (x0 - x0_pred).pow(2).flatten(1).sum(1)
    if not decoder_constant:
        return weights * squared_error
    dims = x0[0].numel()
    decoder_const = torch.where(t == 1, 0.5 * dims * torch.log(2 * math.pi * process.b[1].to(x0) ** 2),
                                torch.zeros((), dtype=x0.dtype, device=x0.device))
    return weights * squared_error + decoder_const


def prior_kl(process, x0):
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample in nats, shape (B,)."""
    a_T, b_T = process.a[-1].item(), process.b[-1].item()
    mean2 = (a_T * x0).pow(2).flatten(1).sum(1)
    dims = x0[0].numel()
    return 0.5 * (mean2 + dims * (b_T**2 - 1 - math.log(b_T**2)))


def forward_loss(process, kind, x0, x0_pred, t):
    """Per-sample forward loss (B,). mse: mean squared error on x0. kl: the variational-bound term
    L_{t-1} (vlb_terms, nats) times T, per dimension: an unbiased estimate of the bound's
    sum over t for t ~ U{1..T}, without the terms that carry no gradient (L_T, the decoder's constant)."""
    if kind == "mse":
        return (x0_pred - x0).pow(2).mean(1)
    return process.T * vlb_terms(process, x0, x0_pred, t, decoder_constant=False) / x0.shape[1]


def training_losses(model, process, args, loss_kind, semi_implicit, x0, y, generator):
    """The four losses of one batch (SPEC section 1). Returns (total, {name: float})."""
    batch, device = x0.shape[0], x0.device
    t = torch.randint(1, process.T + 1, (batch,), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    drop = torch.rand(batch, generator=generator).to(device) < args.label_dropout
    label = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
    forward_z, inverse_z, no_label = torch.zeros_like(y), torch.ones_like(y), torch.full_like(y, NULL_LABEL)

    x_t = common.q_sample(process, x0, t, noise)
    x0_pred = model(x_t, t, forward_z, label)                               # 1. forward: x_t -> x0
    losses = {"forward": forward_loss(process, loss_kind, x0, x0_pred, t).mean()}
    total = args.weight_forward * losses["forward"]
    if semi_implicit:
        target = prime_inverse(x0, y)
        inverse_pred = model(x0, t, inverse_z, no_label)                    # 2. inverse: x0 -> prime(x0)
        losses["inverse"] = F.mse_loss(inverse_pred, target)
        losses["rt_fi"] = F.mse_loss(model(x0_pred, t, inverse_z, no_label), target)  # 3. x_t -> x0 -> prime
        losses["rt_if"] = F.mse_loss(model(inverse_pred, t, forward_z, label), x0)     # 4. x0 -> prime -> x0
        total = total + (args.weight_inverse * losses["inverse"] + args.weight_rt_fi * losses["rt_fi"]
                         + args.weight_rt_if * losses["rt_if"])
    return total, {name: value.item() for name, value in losses.items()}


# ----------------------------------------------------------------------------------------------
# evaluation

def trivial_baselines(data):
    """MSEs that need no model: predict zero, predict the training-set class mean (forward and inverse)."""
    x, y, x_test, y_test = data["x"], data["y"], data["x_test"], data["y_test"]
    class_means = torch.stack([x[y == c].mean(0) for c in range(NUM_CLASSES)])
    prime_means = torch.stack([prime_inverse(x, y)[y == c].mean(0) for c in range(NUM_CLASSES)])
    prime_test = prime_inverse(x_test, y_test)
    return {
        "predict_zero_mse": x_test.pow(2).mean().item(),
        "class_mean_mse": (x_test - class_means[y_test]).pow(2).mean().item(),
        "inverse_predict_zero_mse": prime_test.pow(2).mean().item(),
        "inverse_class_mean_mse": (prime_test - prime_means[y_test]).pow(2).mean().item(),
    }


class LinearDenoiser:
    """The best linear denoiser, the reference every forward MSE is judged against: the Wiener filter
    (the linear minimum-mean-squared-error estimator) from the training mean mu and covariance C,

        x0_hat = mu + a C (a^2 C + b^2 I)^{-1} (x_t - a mu)        for x_t = a x0 + b eps,

    which for Gaussian data is the exact posterior mean E[x0 | x_t]. With C = U diag(lam) U^T it is a
    per-eigendirection gain a lam / (a^2 lam + b^2), and its expected MSE per dimension is
    mean_i(lam_i b^2 / (a^2 lam_i + b^2)). Called like the model: (x_t (B, 40), t (B,), z, y) -> (B, 40)."""

    def __init__(self, x_train, process):
        x = x_train.double().cpu()
        self.mean = x.mean(0)                                        # (40,)
        eigenvalues, self.basis = torch.linalg.eigh(torch.cov(x.T))  # (40,), (40, 40) columns = U
        self.eigenvalues = eigenvalues.clamp(min=0)
        self.process = process

    def __call__(self, x_t, t, z=None, y=None):
        a = self.process.a[t.cpu()][:, None]                         # (B, 1) float64
        b = self.process.b[t.cpu()][:, None]
        gain = a * self.eigenvalues / (a**2 * self.eigenvalues + b**2)  # (B, 40); 1/a at b = 0, 0 at a = 0
        centred = (x_t.double().cpu() - a * self.mean) @ self.basis
        return (self.mean + (gain * centred) @ self.basis.T).to(x_t.dtype).to(x_t.device)

    def expected_mse(self):
        """Closed-form expected MSE per dimension for every t = 0..T, shape (T+1,), under the training moments."""
        a, b = self.process.a[:, None], self.process.b[:, None]
        return (self.eigenvalues * b**2 / (a**2 * self.eigenvalues + b**2)).mean(1)


# The mid-noise band: the t where the linear denoiser's expected MSE is between these values (data variance
# is about 1 per dimension). Below it every denoiser is near perfect; above it every denoiser predicts
# little more than the mean. It is where a denoiser can show that it learned more than a linear filter.
BAND_MSE = (0.05, 0.5)


def mid_noise_band(linear):
    """Boolean mask over t = 0..T, shape (T+1,): linear expected MSE within BAND_MSE (t = 0 excluded)."""
    mse = linear.expected_mse()
    band = (mse >= BAND_MSE[0]) & (mse <= BAND_MSE[1])
    band[0] = False
    return band


@torch.no_grad()
def evaluate(model, process, data, args, device, band=None, forward_only=False):
    """Test metrics on the 1000 test signals, identical t grid and noise for every config (and for
    the linear denoiser, which is evaluated by this same function).

    t = 1 is evaluated exactly; 2..T is split into --eval-strata strata with one uniform t per
    stratum and signal. Forward metrics use the null label (unconditional denoising).
    test_kl: the variational bound L_T + sum_t L_{t-1} per dimension (nats), stratified estimate.
    band: mask over t (mid_noise_band); test_mse_forward_band is the forward MSE over the (signal, t)
    pairs whose t lies in it. forward_only: skip the conditional, inverse and KL passes."""
    x0, y = data["x_test"].to(device), data["y_test"].to(device)
    n, dims = x0.shape
    generator = torch.Generator().manual_seed(12345)
    edges = torch.linspace(2, process.T + 1, args.eval_strata + 1).round().long()
    forward_z, inverse_z = torch.zeros_like(y), torch.ones_like(y)
    no_label = torch.full_like(y, NULL_LABEL)
    target_inverse = prime_inverse(x0, y)

    strata = [(torch.ones(n, dtype=torch.long), 1)]  # (t per signal, number of timesteps it stands for)
    for lo, hi in zip(edges[:-1], edges[1:]):
        strata.append((torch.randint(int(lo), int(hi), (n,), generator=generator), int(hi - lo)))
    sums = {"forward": 0.0, "forward_conditional": 0.0, "inverse": 0.0, "mae": 0.0, "vlb": 0.0,
            "band": 0.0, "band_count": 0.0}
    forward_by_stratum, stratum_centres = [], []
    for t, size in strata:
        t = t.to(device)
        x_t = common.q_sample(process, x0, t, torch.randn(x0.shape, generator=generator).to(device))
        pred = model(x_t, t, forward_z, no_label)
        error = (pred - x0).pow(2).mean(1)  # (n,) per-signal forward MSE
        forward = error.mean().item()
        sums["forward"] += size * forward
        sums["mae"] += size * (pred - x0).abs().mean().item()
        if band is not None:
            in_band = band.to(device)[t]
            sums["band"] += size * error[in_band].sum().item()
            sums["band_count"] += size * in_band.sum().item()
        if not forward_only:
            sums["forward_conditional"] += size * (model(x_t, t, forward_z, y) - x0).pow(2).mean().item()
            sums["inverse"] += size * (model(x0, t, inverse_z, no_label) - target_inverse).pow(2).mean().item()
            sums["vlb"] += size * vlb_terms(process, x0, pred, t).mean().item()
        forward_by_stratum.append(forward)
        stratum_centres.append(t.float().mean().item())
    T = process.T
    metrics = {
        "test_mse_forward": sums["forward"] / T,
        "test_mae": sums["mae"] / T,
        "forward_mse_by_t": {"t": stratum_centres, "mse": forward_by_stratum},
    }
    if band is not None:
        metrics["test_mse_forward_band"] = sums["band"] / sums["band_count"] if sums["band_count"] else float("nan")
    if not forward_only:
        metrics.update({
            "test_mse_forward_conditional": sums["forward_conditional"] / T,
            "test_mse_inverse": sums["inverse"] / T,
            "test_kl": (sums["vlb"] + prior_kl(process, x0).mean().item()) / dims,
        })
        metrics["test_mse"] = (metrics["test_mse_forward"] + metrics["test_mse_inverse"]) / 2
    return metrics


def linear_reference(noise, args, data, device):
    """The linear denoiser of one process, evaluated on the models' t grid and noise: overall MSE, per
    stratum, in the mid-noise band, the band's t range and the closed-form expected curve."""
    process = common.make_process(noise, args.T, args.schedule)
    linear = LinearDenoiser(data["x"], process)
    band = mid_noise_band(linear)
    metrics = evaluate(linear, process, data, args, device, band=band, forward_only=True)
    band_t = torch.nonzero(band).flatten()
    expected = linear.expected_mse()
    every = max(1, args.T // 200)  # the closed-form curve at <= ~200 points, for the plot
    return {"mse": metrics["test_mse_forward"], "band_mse": metrics["test_mse_forward_band"],
            "mse_by_t": metrics["forward_mse_by_t"],
            "band_t": [int(band_t.min()), int(band_t.max())] if len(band_t) else None,
            "expected_mse_by_t": {"t": list(range(0, args.T + 1, every)), "mse": expected[::every].tolist()},
            "band": band}


@torch.no_grad()
def generate(model, process, args, device, seed):
    """Class-wise samples from pure noise with the reverse process. Returns x (N, 40), labels (N,)."""
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.samples_per_class)
    generator = torch.Generator().manual_seed(seed)
    x_T = process.b[-1].item() * torch.randn((len(labels), 40), generator=generator).to(device)
    model_fn = lambda x, t, cond: model(x, t, torch.zeros_like(cond), cond)  # z = 0: the generative direction
    guided = common.guidance_interval(process, *args.guidance_interval) if args.guidance_interval else None
    denoise = common.cfg_denoiser(model_fn, labels, torch.full_like(labels, NULL_LABEL), args.guidance_scale, guided)
    sampler = common.SAMPLERS[args.sampler]
    return sampler(denoise, x_T, process, args.sample_steps, generator=generator), labels


@torch.no_grad()
def sample_quality(classifier, samples, labels, reference_features):
    """(FD or None, why there is none, accuracy): a diverged model's NaN samples have no FD, reported as such."""
    features = classifier.features(samples).cpu().numpy()
    accuracy = (classifier.head(classifier.features(samples)).argmax(1) == labels).float().mean().item()
    distance, reason = common.frechet_distance_or_reason(features, reference_features)
    return distance, reason, accuracy


def smooth(curve, window=5):
    """Centred moving average (the window shrinks at the ends), for noise-dominated per-epoch curves."""
    values = np.asarray(curve, dtype=np.float64)
    half = window // 2
    return np.array([values[max(0, i - half): i + half + 1].mean() for i in range(len(values))])


def convergence(train_loss):
    """convergence_rate: r of the least-squares fit log(loss_e) = c - r * e over epochs (per epoch,
    higher = faster); on the noisy KL curves it is near 0 and not comparable, so it is reported but
    never ranked. epochs_to_90pct: the first epoch whose smoothed loss (5-epoch centred moving
    average) has made 90% of the smoothed curve's total decrease."""
    losses = np.asarray(train_loss, dtype=np.float64)
    if len(losses) < 2 or (losses <= 0).any():
        return float("nan"), len(losses)
    rate = -np.polyfit(np.arange(len(losses)), np.log(losses), 1)[0]
    smoothed = smooth(losses)
    threshold = smoothed[-1] + 0.1 * (smoothed[0] - smoothed[-1])
    return float(rate), int(np.argmax(smoothed <= threshold)) + 1


# ----------------------------------------------------------------------------------------------
# one configuration, one seed: train (resumable), evaluate, generate

def run_identity(args):
    """The RUN_IDENTITY flags' values, as JSON would store them."""
    return json.loads(json.dumps({key: getattr(args, key) for key in RUN_IDENTITY}))


def identity_mismatch(stored, args, where):
    """A UserError naming every flag whose value differs from the run in `where`, or None if all match."""
    if not isinstance(stored, dict):
        return common.UserError(f"--resume: {where} has no run identity (written by an older version); "
                                f"use another --outdir")
    current = run_identity(args)
    changed = [key for key in RUN_IDENTITY if stored.get(key) != current[key]]
    if not changed:
        return None
    flags = ", ".join(f"--{key.replace('_', '-')} {stored.get(key)} (now {current[key]})" for key in changed)
    return common.UserError(f"--resume: {where} was run with {flags}; use those settings or another --outdir")


def load_finished_result(result_path, args, label):
    """The result.json of a config finished earlier with the same settings (else a one-line error)."""
    with open(result_path) as file:
        result = json.load(file)
    mismatch = identity_mismatch(result.get("identity"), args, result_path)
    if mismatch:
        raise mismatch
    print(f"{label} done earlier with the same settings, loading {result_path}")
    return result


def evaluate_config(ema_model, process, data, args, device, linear, classifier, reference_features, seed):
    """The test metrics of a trained config beside the best linear denoiser (`linear`), and its generated
    signals scored by the classifier: the model-dependent part of its result."""
    metrics = evaluate(ema_model, process, data, args, device, band=linear["band"])
    samples, labels = generate(ema_model, process, args, device, seed=seed + 777)
    sample_fd, sample_fd_reason, sample_accuracy = sample_quality(classifier, samples, labels, reference_features)
    return {
        **{k: v for k, v in metrics.items() if k != "forward_mse_by_t"},
        # the forward MSE as a multiple of the best linear denoiser's, overall and in the mid-noise band
        "linear_ratio": metrics["test_mse_forward"] / linear["mse"],
        "linear_ratio_band": metrics["test_mse_forward_band"] / linear["band_mse"],
        "sample_fd": sample_fd, "sample_fd_unavailable": sample_fd_reason, "sample_accuracy": sample_accuracy,
        "forward_mse_by_t": metrics["forward_mse_by_t"],
        "samples": samples[:: args.samples_per_class // 4 or 1].cpu().tolist(),
        "sample_labels": labels[:: args.samples_per_class // 4 or 1].cpu().tolist(),
    }


def build_model(process, args, seed, total_steps, device):
    """(the Denoiser, its EMA, AdamW, the learning-rate schedule: linear warm-up, then cosine decay to 0 at
    total_steps), the weights drawn from `seed`."""
    torch.manual_seed(seed)
    model = Denoiser(process, args.width).to(device)
    ema = common.EMA(model, args.ema_decay)
    # fused: one kernel for all parameters; the per-tensor loop costs ~4 ms a step on 2 CPU cores (7% of an implicit step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    return model, ema, optimizer, schedule


def resume_from(checkpoint_path, args, name, model, ema, optimizer, schedule, generator):
    """Restore a stopped config's training state into model, EMA, optimiser, schedule and generator, after
    checking that the settings that change its numbers agree; returns its progress dict."""
    checkpoint = common.load_checkpoint(checkpoint_path, script=SCRIPT, kinds={name})
    mismatch = identity_mismatch(checkpoint.get("identity"), args, checkpoint_path)
    if mismatch:
        raise mismatch
    common.restore_training_state(checkpoint, checkpoint_path, model, ema, optimizer, generator)
    schedule.load_state_dict(checkpoint["lr_schedule"])
    return checkpoint["progress"]


def train_step(train_model, model, ema, optimizer, schedule, process, args, loss_kind, semi_implicit, x0, y, generator,
               where, checkpoint_path):
    """One optimiser step on training_losses; returns (the loss as a float, its parts, the gradient norm before
    clipping)."""
    with common.autocast(x0.device):
        loss, parts = training_losses(train_model, process, args, loss_kind, semi_implicit, x0, y, generator)
    loss_value = common.finite_loss(loss, where, checkpoint_path)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    schedule.step()
    ema.update(model)
    return loss_value, parts, grad_norm


def training_curves(history):
    """The per-epoch mean training loss, its convergence figures and the per-epoch means of its parts."""
    train_loss = [epoch_means["loss"] for epoch_means in history]
    convergence_rate, epochs_to_90pct = convergence(train_loss)
    return {"convergence_rate": convergence_rate, "epochs_to_90pct": epochs_to_90pct, "train_loss": train_loss,
            "train_components": {k: [e[k] for e in history] for k in history[0] if k != "loss"} if history else {}}


def end_epoch(state, steps_per_epoch, started, logger, record, step):
    """Close the epoch in state: its mean losses go to the history (and, beside `record`, to the log at `step`),
    the running sums are reset and the training clock, started at `started`, is saved."""
    means = {key: value / steps_per_epoch for key, value in state["running"].items()}
    state["history"].append(means)
    state.update(epoch=record["epoch"], step_in_epoch=0, running={}, runtime_s=time.time() - started)
    logger.log({**record, "train/loss": means["loss"], **{f"train/{k}": v for k, v in means.items() if k != "loss"}},
               step=step)


def run_config(name, seed, args, data, classifier, reference_features, device, stop, logger_args, linear):
    """Train one config with one seed (resumable), evaluate it against its process's linear denoiser
    (`linear`, from linear_reference), generate; write and return its result."""
    loss_kind, noise = name.split("-")[:2]
    training = name.split("-", 2)[2]
    semi_implicit = training == "semi-implicit"
    run_dir = os.path.join(args.outdir, "runs", f"{name}-seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    result_path, checkpoint_path = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "checkpoint.pt")
    if args.resume and os.path.exists(result_path):
        return load_finished_result(result_path, args, f"[{name} seed {seed}]")

    process = common.make_process(noise, args.T, args.schedule)
    x, y = data["x"].to(device), data["y"].to(device)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    model, ema, optimizer, schedule = build_model(process, args, seed, total_steps, device)
    generator = torch.Generator().manual_seed(seed)
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "running": {}, "runtime_s": 0.0}
    resumed = args.resume and os.path.exists(checkpoint_path)
    if resumed:
        state = resume_from(checkpoint_path, args, name, model, ema, optimizer, schedule, generator)
        print(f"[{name} seed {seed}] resuming at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    elif args.resume:
        print(f"[{name} seed {seed}] --resume: nothing to resume in {run_dir} (no checkpoint); starting from scratch")
    train_model = torch.compile(model) if args.compile else model
    print(f"[{name} seed {seed}] denoiser with {common.count_parameters(model):,} parameters, "
          f"{args.epochs} epochs x {steps_per_epoch} steps on {device}")

    def save(path=checkpoint_path):
        common.save_checkpoint(path, {
            **common.training_state(model, ema, optimizer, generator), "lr_schedule": schedule.state_dict(),
            "progress": state, "config": vars(args), "identity": run_identity(args),
            "meta": common.checkpoint_meta(SCRIPT, name, seed=seed, width=args.width, T=args.T)})

    logger = common.RunLogger(args.outdir, {**vars(args), "config_name": name, "seed": seed, **logger_args},
                              args.wandb, project=args.wandb_project, group=os.path.basename(os.path.abspath(args.outdir)),
                              name=f"{name}-seed{seed}", resume=resumed)
    if resumed:  # the steps after the checkpoint are logged again: drop their first records
        logger.truncate_after(state["epoch"] * steps_per_epoch + state["step_in_epoch"], config=name, seed=seed)
    started = time.time() - state["runtime_s"]
    bar = common.tqdm_maybe(range(state["epoch"] * steps_per_epoch + state["step_in_epoch"], total_steps),
                            not args.no_progress, desc=f"{name} s{seed}", total=total_steps,
                            initial=state["epoch"] * steps_per_epoch + state["step_in_epoch"])
    for global_step in bar:
        epoch, step = divmod(global_step, steps_per_epoch)
        # the epoch's permutation depends only on (seed, epoch), so a resumed run sees the same batches
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        loss_value, parts, grad_norm = train_step(train_model, model, ema, optimizer, schedule, process, args, loss_kind,
                                                  semi_implicit, x[batch], y[batch], generator,
                                                  f"[{name}] epoch {epoch + 1} step {step}", checkpoint_path)
        for key, value in {"loss": loss_value, **parts}.items():
            state["running"][key] = state["running"].get(key, 0.0) + value
        state["step_in_epoch"] = step + 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if step + 1 == steps_per_epoch:
            end_epoch(state, steps_per_epoch, started, logger, {"config": name, "seed": seed, "epoch": epoch + 1,
                      "train/lr": schedule.get_last_lr()[0], "train/grad_norm": grad_norm.item()}, global_step + 1)
            save()
        if stop.received:
            state["runtime_s"] = time.time() - started
            save()
            print(f"[{name}] received {stop.received}: checkpoint saved to {checkpoint_path}; "
                  f"rerun with --resume to continue")
            logger.finish()
            sys.exit(0)
    runtime = time.time() - started

    result = {
        "name": name, "loss": loss_kind, "noise": noise, "training": training, "seed": seed,
        **evaluate_config(ema.model.eval(), process, data, args, device, linear, classifier, reference_features, seed),
        "runtime_s": runtime, **training_curves(state["history"]), "parameters": common.count_parameters(model),
        "identity": run_identity(args),
    }
    common.write_json(result_path, result)  # first: a kill after it cannot make a resumed run log the test record twice
    logger.log({"config": name, "seed": seed, **{f"test/{k}": v for k, v in result.items()
                                                   if isinstance(v, float)}}, step=total_steps)
    logger.finish(result)
    print_result(result)
    return result


def print_result(result):
    """One config and seed's line: its test MSEs against the linear denoiser, KL, sample FD and accuracy."""
    fd = f"{result['sample_fd']:.2f}" if result["sample_fd"] is not None else f"n/a ({result['sample_fd_unavailable']})"
    print(f"[{result['name']} seed {result['seed']}] test mse fwd {result['test_mse_forward']:.4f} "
          f"({result['linear_ratio']:.3f} x linear, {result['linear_ratio_band']:.3f} x in the mid-noise band) "
          f"inv {result['test_mse_inverse']:.4f} kl {result['test_kl']:.3f} | samples FD {fd} "
          f"acc {result['sample_accuracy']:.3f} | {result['runtime_s']:.0f}s")


# ----------------------------------------------------------------------------------------------
# aggregation, report, plots

SCALARS = ["test_mse", "test_mse_forward", "test_mse_forward_conditional", "test_mse_forward_band", "linear_ratio",
           "linear_ratio_band", "test_mse_inverse", "test_mae", "test_kl", "runtime_s", "convergence_rate",
           "epochs_to_90pct", "sample_fd", "sample_accuracy"]


def aggregate(per_seed):
    """Mean over seeds for every scalar (std beside it), mean curves, and the per-seed results.

    Curves of different lengths (seeds stopped at different epochs) are averaged over their common
    first epochs; `curve_epochs` says how many."""
    first = per_seed[0]
    entry = {k: first[k] for k in ("name", "loss", "noise", "training")}
    for key in SCALARS:
        values = np.array([r.get(key) if r.get(key) is not None else float("nan") for r in per_seed], dtype=np.float64)
        entry[key] = float(values.mean())
        entry.setdefault("std", {})[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    common_prefix = lambda curves: np.mean([c[:min(len(c) for c in curves)] for c in curves], axis=0).tolist()
    entry["train_loss"] = common_prefix([r["train_loss"] for r in per_seed])
    entry["curve_epochs"] = len(entry["train_loss"])
    entry["train_components"] = {k: common_prefix([r["train_components"][k] for r in per_seed])
                                 for k in first["train_components"]}
    entry["forward_mse_by_t"] = {"t": first["forward_mse_by_t"]["t"],
                                 "mse": np.mean([r["forward_mse_by_t"]["mse"] for r in per_seed], axis=0).tolist()}
    entry["seeds"] = [r["seed"] for r in per_seed]
    entry["per_seed"] = [{k: r.get(k, float("nan")) for k in SCALARS} for r in per_seed]
    entry["samples"], entry["sample_labels"] = first["samples"], first["sample_labels"]
    return entry


def plot_all(results, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs, baselines = results["configs"], results["baselines"]
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, loss_kind in zip(axes, LOSSES):
        for c in (c for c in configs if c["loss"] == loss_kind):
            epochs = range(1, len(c["train_loss"]) + 1)
            line, = ax.plot(epochs, smooth(c["train_loss"]), label=c["name"])  # the KL curves are noise-dominated
            ax.plot(epochs, c["train_loss"], color=line.get_color(), alpha=0.25, lw=0.8)
        ax.set(title=f"training loss ({loss_kind}; 5-epoch moving average, raw faint)", xlabel="epoch", yscale="log")
        if ax.lines:
            ax.legend(fontsize=7)
    written.append(_save(fig, outdir, "loss_curves.png"))

    semi = [c for c in configs if c["training"] == "semi-implicit"]
    if semi:
        fig, axes = plt.subplots(1, len(semi), figsize=(4 * len(semi), 3.5), squeeze=False)
        for ax, c in zip(axes[0], semi):
            for key, curve in c["train_components"].items():
                ax.plot(range(1, len(curve) + 1), curve, label=key)
            ax.set(title=c["name"], xlabel="epoch", yscale="log")
            ax.legend(fontsize=7)
        written.append(_save(fig, outdir, "loss_components.png"))

    linear = baselines["linear_denoiser"]
    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for c in configs:
        line, = ax.plot(c["forward_mse_by_t"]["t"], c["forward_mse_by_t"]["mse"], label=c["name"], lw=1)
        ratio = np.array(c["forward_mse_by_t"]["mse"]) / np.array(linear[c["noise"]]["mse_by_t"]["mse"])
        ratio_ax.plot(c["forward_mse_by_t"]["t"], ratio, color=line.get_color(), label=c["name"], lw=1)
    for noise, style in (("gaussian", "--"), ("convex", "-.")):
        if noise in linear:
            reference = linear[noise]["mse_by_t"]
            ax.plot(reference["t"], reference["mse"], "k" + style, lw=1.5, label=f"best linear denoiser ({noise})")
            if linear[noise]["band_t"]:
                for a in (ax, ratio_ax):
                    a.axvspan(*linear[noise]["band_t"], color="gray" if noise == "gaussian" else "tan", alpha=0.12)
    ax.axhline(baselines["predict_zero_mse"], color="k", ls=":", lw=0.8, label="predict zero")
    ax.axhline(baselines["class_mean_mse"], color="gray", ls=":", lw=0.8, label="class mean")
    ax.set(title="forward (denoising) test MSE by timestep", xlabel="t", ylabel="MSE")
    ax.legend(fontsize=6)
    ratio_ax.axhline(1, color="k", ls="--", lw=1)
    ratio_ax.set(title="forward MSE / best linear denoiser (shaded: mid-noise band)", xlabel="t", ylabel="ratio")
    written.append(_save(fig, outdir, "forward_mse_vs_t.png"))

    for c in configs:
        samples, labels = np.array(c["samples"]), np.array(c["sample_labels"])
        fig, axes = plt.subplots(2, 5, figsize=(12, 4), sharex=True)
        for digit, ax in enumerate(axes.flat):
            for signal in samples[labels == digit]:
                ax.plot(signal, lw=1)
            ax.set_title(f"digit {digit}", fontsize=8)
        fig.suptitle(f"generated signals: {c['name']}")
        written.append(_save(fig, outdir, f"samples_{c['name']}.png"))
    return written


def plot_prime_inverses(data, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 5, figsize=(13, 5))
    for digit, ax in enumerate(axes.flat):
        signal = data["x"][data["y"] == digit][:1]
        ax.plot(signal[0], label="x")
        ax.plot(prime_inverse(signal, torch.tensor([digit]))[0], label="prime(x)")
        ax.set_title(f"{digit}: {PRIME_INVERSES[digit][0]}", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("prime-inverse transform per digit")
    return _save(fig, outdir, "prime_inverse.png")


def _save(fig, outdir, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, name), dpi=90)
    plt.close(fig)
    return name


def linear_verdict(c):
    """The verdict of a config against the best linear denoiser, over every seed it was run with."""
    overall = [r["linear_ratio"] for r in c["per_seed"]]
    band = [r["linear_ratio_band"] for r in c["per_seed"]]
    every = " in every seed" if len(overall) > 1 else ""
    if max(overall) < 1 and max(band) < 1:
        return f"learned: beats the best linear denoiser overall and in the mid-noise band{every}"
    if min(overall) >= 1 and min(band) >= 1:
        return "NOT better than the best linear denoiser (a linear filter of the training moments does at least as well)"
    return "not clearly better than the best linear denoiser (beats it only in part of the t range or of the seeds)"


def exceeds_spread(first, second, key):
    """Whether two configs' means differ beyond the seed spread: Welch's t-test at the 5% level (two-sided),
    t = difference / standard error of the difference (std over seeds / sqrt(seeds)), against the t
    quantile at the Welch-Satterthwaite degrees of freedom (Welch 1947). With 3 seeds per config that
    asks for about 3-4 standard errors, not 2. None with one seed (no spread to compare against)."""
    from scipy import stats
    n1, n2 = len(first["seeds"]), len(second["seeds"])
    if min(n1, n2) < 2 or not math.isfinite(first[key] - second[key]):
        return None
    v1, v2 = first["std"][key] ** 2 / n1, second["std"][key] ** 2 / n2
    difference = abs(first[key] - second[key])
    if v1 + v2 == 0:
        return difference > 0
    dof = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    return bool(difference / math.sqrt(v1 + v2) > stats.t.ppf(0.975, dof))


def write_report(results, plots, outdir):
    configs, baselines, reference = results["configs"], results["baselines"], results["reference"]
    linear = baselines["linear_denoiser"]
    counts = sorted({len(c["seeds"]) for c in configs})
    seeds = counts[-1]
    seeds_text = f"{seeds} seed(s)" if len(counts) == 1 else f"{counts[0]}-{seeds} seeds per config (a merge of finished runs)"
    pm = lambda c, k, fmt: f"{c[k]:{fmt}} ± {c['std'][k]:{fmt}}" if len(c["seeds"]) > 1 else f"{c[k]:{fmt}}"
    lines = [f"# MNIST1D: implicit vs semi-implicit diffusion training", "",
             f"Dataset {results['dataset']['name']} ({results['dataset']['train']} train / {results['dataset']['test']} test), "
             f"{results['args']['epochs']} epochs per config, {seeds_text}{' (mean ± std over seeds)' if seeds > 1 else ''}, "
             f"device {results['device']}. Test metrics on the {results['dataset']['test']} test signals with the EMA weights.", "",
             "Forward MSE is judged against the best linear denoiser (the Wiener filter of the training mean and "
             "covariance, on the same t grid and noise): `/ linear` is the ratio overall, `/ linear (band)` in the "
             f"mid-noise band (the t where the linear denoiser's expected MSE is between {BAND_MSE[0]} and {BAND_MSE[1]}).", "",
             "| config | forward MSE | / linear | / linear (band) | inverse MSE | KL (nats/dim) | sample FD | sample acc | epochs to 90% | runtime (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        label = c["name"] if len(counts) == 1 else f"{c['name']} ({len(c['seeds'])} seeds)"
        lines.append(f"| {label} | {pm(c, 'test_mse_forward', '.4f')} | {pm(c, 'linear_ratio', '.3f')} | "
                     f"{pm(c, 'linear_ratio_band', '.3f')} | {pm(c, 'test_mse_inverse', '.4f')} | {pm(c, 'test_kl', '.3f')} | "
                     f"{pm(c, 'sample_fd', '.2f')} | {pm(c, 'sample_accuracy', '.3f')} | {pm(c, 'epochs_to_90pct', '.0f')} | "
                     f"{pm(c, 'runtime_s', '.0f')} |")
    lines += ["", "## References", ""]
    for noise, ref in linear.items():
        band = f"t {ref['band_t'][0]}..{ref['band_t'][1]}" if ref["band_t"] else "empty"
        lines.append(f"- Best linear denoiser, {noise} process: forward MSE {ref['mse']:.4f} overall, "
                     f"{ref['band_mse']:.4f} in the mid-noise band ({band}).")
    lines += [f"- Forward task, predict zero: MSE {baselines['predict_zero_mse']:.4f}; predict the class mean "
              f"(uses the label): {baselines['class_mean_mse']:.4f} (context: both ignore x_t).",
              f"- Inverse task, predict zero: MSE {baselines['inverse_predict_zero_mse']:.4f}; class mean: "
              f"{baselines['inverse_class_mean_mse']:.4f}. Implicit configs never train the inverse direction.",
              f"- Real vs real: classifier-feature FD of 1000 fresh real signals vs the test set {reference['real_fd']:.2f}; "
              f"classifier accuracy on the real test set {reference['real_accuracy']:.3f}.", "",
              "## Verdicts (forward MSE against the best linear denoiser)", ""]
    for c in configs:
        lines.append(f"- {c['name']}: {c['linear_ratio']:.3f} x linear overall, {c['linear_ratio_band']:.3f} x in the "
                     f"mid-noise band: {linear_verdict(c)}; sample FD = "
                     + (f"{c['sample_fd'] / reference['real_fd']:.1f} x real-vs-real." if math.isfinite(c["sample_fd"])
                        else "n/a (no FD in some seed: non-finite samples)."))
    lines += ["", "## Implicit vs semi-implicit (same loss and noise)", "",
              "'Exceeds the seed spread' = the difference passes Welch's t-test over seeds (5%, two-sided).", ""]
    for loss_kind in LOSSES:
        for noise in NOISES:
            pair = [next((c for c in configs if c["name"] == f"{loss_kind}-{noise}-{t}"), None) for t in TRAININGS]
            if None in pair:
                continue
            parts = []
            for key, label in (("test_mse_forward", "forward MSE"), ("sample_fd", "sample FD"),
                               ("sample_accuracy", "sample acc")):
                spread = exceeds_spread(pair[0], pair[1], key)
                note = "" if spread is None else (" (exceeds the seed spread)" if spread else " (within the seed spread)")
                parts.append(f"{label} {pair[0][key]:.4g} -> {pair[1][key]:.4g}{note}")
            lines.append(f"- {loss_kind}-{noise}: " + "; ".join(parts))
    lines += ["", "## Best config per metric", "",
              "Inverse MSE and test MSE (the mean of forward and inverse) are ranked among the semi-implicit configs "
              "only: implicit configs never train the inverse. convergence_rate is in results.json but not ranked "
              "(the KL training curves are noise-dominated)."
              + (" 'Clear' = the lead over the runner-up passes Welch's t-test over seeds (5%, two-sided)."
                 if seeds > 1 else " One seed: no spread to judge differences by; run --seeds 3."), ""]
    semi = [c for c in configs if c["training"] == "semi-implicit"]
    for key, better, pool in [("test_mse_forward", min, configs), ("linear_ratio_band", min, configs),
                              ("test_mse_inverse", min, semi), ("test_mse", min, semi), ("test_kl", min, configs),
                              ("sample_fd", min, configs), ("sample_accuracy", max, configs), ("runtime_s", min, configs)]:
        pool = [c for c in pool if math.isfinite(c[key])]  # a config with no FD (diverged) is not ranked on it
        if not pool:
            continue
        ranked = sorted(pool, key=lambda c: c[key], reverse=better is max)
        note = ""
        if len(ranked) > 1 and exceeds_spread(ranked[0], ranked[1], key) is not None:
            note = (f"; clear of the runner-up {ranked[1]['name']}" if exceeds_spread(ranked[0], ranked[1], key)
                    else f"; not clear of the runner-up {ranked[1]['name']} ({ranked[1][key]:.4g})")
        lines.append(f"- {key}: {ranked[0]['name']} ({ranked[0][key]:.4g}{note})")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    with open(os.path.join(outdir, "report.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------

def preflight(args):
    """--check: imports, W&B status, dataset generation, device and one training step, in seconds."""
    started = time.time()
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    for module in ("scipy", "matplotlib", "tqdm", "mnist1d", "wandb"):
        try:
            __import__(module)
            print(f"import {module}: ok")
        except ImportError as error:
            raise common.UserError(f"import {module} failed ({error}); run pip install -r requirements.txt")
    print(wandb_status())
    device = common.pick_device(args.device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    data = load_mnist1d(args.data_dir, args.dataset_seed)
    print(f"MNIST1D: {len(data['x'])} train / {len(data['x_test'])} test signals, cached in {args.data_dir}")
    process = common.make_process("gaussian", args.T, args.schedule)
    model = Denoiser(process, args.width).to(device)
    loss, _ = training_losses(model, process, args, "kl", True, data["x"][:8].to(device), data["y"][:8].to(device),
                              torch.Generator().manual_seed(0))
    loss.backward()
    print(f"one semi-implicit KL training step: loss {loss.item():.3f}, gradients finite: "
          f"{all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)}")
    print(f"pre-flight passed in {time.time() - started:.1f}s")


def references(args, device):
    """Data, evaluation classifier and every reference a sweep is judged against (same for every config)."""
    data = load_mnist1d(args.data_dir, args.dataset_seed)
    fresh = load_mnist1d(args.data_dir, args.dataset_seed + 1)  # unseen real signals for the real-vs-real FD
    dataset = {"name": "mnist1d", "train": len(data["x"]), "test": len(data["x_test"]), "classes": NUM_CLASSES,
               "seed": args.dataset_seed}
    classifier, classifier_accuracy = load_or_train_classifier(data, args.data_dir, args.dataset_seed, device)
    with torch.no_grad():
        reference_features = classifier.features(data["x_test"].to(device)).cpu().numpy()
        real_fd = common.frechet_distance(classifier.features(fresh["x_test"].to(device)).cpu().numpy(), reference_features)
    baselines = trivial_baselines(data)
    linear = {noise: linear_reference(noise, args, data, device)
              for noise in NOISES if any(name.split("-")[1] == noise for name in args.configs)}
    baselines["linear_denoiser"] = {noise: {k: v for k, v in ref.items() if k != "band"} for noise, ref in linear.items()}
    baselines["linear_denoiser_mse"] = {noise: ref["mse"] for noise, ref in linear.items()}
    baselines["mid_noise_band"] = {"linear_mse_between": list(BAND_MSE),
                                   **{noise: ref["band_t"] for noise, ref in linear.items()}}
    print(f"baselines: best linear denoiser MSE " + ", ".join(f"{noise} {ref['mse']:.4f}" for noise, ref in linear.items())
          + f"; predict-zero MSE {baselines['predict_zero_mse']:.4f}, class-mean MSE {baselines['class_mean_mse']:.4f}; "
          f"real-vs-real FD {real_fd:.2f}, classifier test accuracy {classifier_accuracy:.3f}")
    return {"data": data, "dataset": dataset, "classifier": classifier, "reference_features": reference_features,
            "linear": linear, "baselines": baselines, "reference": {"real_fd": real_fd, "real_accuracy": classifier_accuracy}}


def write_outputs(configs, refs, args, device, plots):
    results = {"configs": configs, "baselines": refs["baselines"], "reference": refs["reference"],
               "dataset": refs["dataset"], "device": str(device), "torch": torch.__version__, "args": vars(args)}
    plots = plots + plot_all(results, args.outdir)
    write_report(results, plots, args.outdir)
    common.write_json(os.path.join(args.outdir, "results.json"), results)
    print(f"wrote {os.path.join(args.outdir, 'results.json')} and report.md")
    return results


def report_main(argv):
    """`report --outdir DIR`: merge whatever configs and seeds are finished in DIR (e.g. by a SLURM array, one
    config per task, or a sweep still running) into results.json, report.md and the plots. Only results
    whose run identity matches DIR's config.json are merged; the others are named and left out."""
    p = common.ArgumentParser(prog="mnist1d_semi_implicit.py report", description=report_main.__doc__.split(":")[0])
    p.add_argument("--outdir", required=True, help="the sweep's output directory (holds config.json and runs/)")
    p.add_argument("--device", default="cpu", help="device for the references (cpu is enough)")
    options = p.parse_args(argv)
    config_path = os.path.join(options.outdir, "config.json")
    if not os.path.isfile(config_path):
        raise common.UserError(f"{options.outdir} holds no sweep (no config.json)")
    # The tasks of an array end at nearly the same time and each merges: one merge at a time (an exclusive lock
    # on outdir/.report.lock), so a merge that read before another task's result.json existed cannot overwrite
    # the later, complete one.
    with open(os.path.join(options.outdir, ".report.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(config_path) as file:
            saved = json.load(file)
        args = parse_args(["--outdir", options.outdir, "--configs", *ALL_CONFIGS])
        for key in RUN_IDENTITY + ("data_dir", "seed", "seeds"):
            if key in saved:
                setattr(args, key, saved[key])
        device = common.pick_device(options.device)
        identity = run_identity(args)
        configs = []
        for name in ALL_CONFIGS:
            per_seed = []
            for seed in range(1000):
                path = os.path.join(options.outdir, "runs", f"{name}-seed{seed}", "result.json")
                if not os.path.exists(path):
                    continue
                with open(path) as file:
                    result = json.load(file)
                if result.get("identity") != identity:
                    print(f"left out {path}: run with other settings than {config_path}")
                    continue
                per_seed.append(result)
            if per_seed:
                configs.append(aggregate(per_seed))
                print(f"{name}: seeds {[r['seed'] for r in per_seed]}")
        if not configs:
            raise common.UserError(f"no finished config in {options.outdir}/runs with the settings of {config_path}")
        refs = references(args, device)
        plots = ["prime_inverse.png"] if os.path.exists(os.path.join(options.outdir, "prime_inverse.png")) else []
        return write_outputs(configs, refs, args, device, plots)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return preflight(args)
    device = common.pick_device(args.device)
    common.prepare_outdir(args.outdir)
    if not args.resume and os.path.isdir(os.path.join(args.outdir, "runs")) and os.listdir(os.path.join(args.outdir, "runs")):
        raise common.UserError(f"{args.outdir} already holds a run; pass --resume to continue it, or choose another --outdir")

    refs = references(args, device)
    common.write_json(os.path.join(args.outdir, "config.json"), {**vars(args), "dataset": refs["dataset"], "device": str(device)})
    plots = [plot_prime_inverses(refs["data"], args.outdir)]

    stop = common.StopSignal()
    configs = []
    for name in args.configs:
        per_seed = [run_config(name, seed, args, refs["data"], refs["classifier"], refs["reference_features"], device,
                               stop, {"dataset": refs["dataset"]}, refs["linear"][name.split("-")[1]])
                    for seed in range(args.seed, args.seed + args.seeds)]
        configs.append(aggregate(per_seed))
    stop.close()
    return write_outputs(configs, refs, args, device, plots)


if __name__ == "__main__":
    common.run_main(main)
