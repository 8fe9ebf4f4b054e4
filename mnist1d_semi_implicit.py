"""MNIST1D diffusion: does teaching one network both directions help?

One denoiser takes a direction flag z: z=0 "forward" (noisy -> clean, the diffusion denoiser) and
z=1 "inverse" (clean -> the digit's prime inverse, a fixed transform per digit, see PRIME_INVERSES).
Eight configurations = {mse, kl} loss x {gaussian, convex} noise x {implicit, semi-implicit} training.

    python mnist1d_semi_implicit.py --outdir runs/mnist1d                 # all 8 configs, ~4 min on 2 CPU cores
    python mnist1d_semi_implicit.py --outdir runs/mnist1d --seeds 3       # every config over 3 seeds, mean +- std
    python mnist1d_semi_implicit.py --outdir runs/one --configs mse-convex-semi-implicit --epochs 60
    python mnist1d_semi_implicit.py --outdir runs/mnist1d --resume        # continue after a kill or preemption
    python mnist1d_semi_implicit.py --check                               # pre-flight, seconds, before sbatch

Writes into --outdir: config.json, metrics.jsonl, runs/<config>-seed<k>/{checkpoint.pt,result.json},
results.json (every metric and curve), report.md, and PNG plots (loss_curves, loss_components,
prime_inverse, forward_mse_vs_t, samples_<config>).
"""
import argparse
import json
import math
import os
import platform
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

# ----------------------------------------------------------------------------------------------
# The prime inverse: one deterministic transform per digit (0, 1 and 9 fixed by the user).
# x: (B, 40). The README has this table with invertibility.
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


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outdir", default="runs/mnist1d", help="directory for everything the run writes")
    p.add_argument("--data-dir", default="./data", help="where the generated MNIST1D pickle and the classifier are cached")
    p.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS, metavar="CONFIG",
                   help=f"configurations to run, of: {' '.join(ALL_CONFIGS)}")
    p.add_argument("--epochs", type=common.positive_int, default=40, help="training epochs per configuration")
    p.add_argument("--batch-size", type=common.positive_int, default=256, help="training batch size")
    p.add_argument("--lr", type=common.positive_float, default=2e-3, help="peak AdamW learning rate (cosine decay after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=common.positive_float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--width", type=common.positive_int, default=16, help="UNet base channels (levels: w, 2w, 2w)")
    p.add_argument("--T", type=common.positive_int, default=1000, help="diffusion timesteps")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear"],
                   help="alpha_bar schedule of the gaussian noise (linear = DDPM betas 1e-4..2e-2)")
    p.add_argument("--label-dropout", type=float, default=0.2,
                   help="probability of replacing the class label by the null label in z=0 passes (classifier-free guidance)")
    p.add_argument("--weight-forward", type=common.nonnegative_float, default=1.0, help="weight of the forward loss")
    p.add_argument("--weight-inverse", type=common.nonnegative_float, default=1.0, help="weight of the inverse loss (semi-implicit)")
    p.add_argument("--weight-rt-fi", type=common.nonnegative_float, default=0.5, help="weight of the forward->inverse round trip (semi-implicit)")
    p.add_argument("--weight-rt-if", type=common.nonnegative_float, default=0.5, help="weight of the inverse->forward round trip (semi-implicit)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the weights used for evaluation")
    p.add_argument("--eval-strata", type=common.positive_int, default=20,
                   help="timestep strata for the test metrics (one random t per stratum and test signal)")
    p.add_argument("--sampler", default="dpmpp", choices=sorted(common.SAMPLERS), help="sampler for generation")
    p.add_argument("--sample-steps", type=common.positive_int, default=50, help="network evaluations per generated batch")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--samples-per-class", type=common.positive_int, default=100, help="generated signals per digit for FD and accuracy")
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument("--seeds", type=common.positive_int, default=1, help="repeat every config over this many seeds (seed, seed+1, ...)")
    p.add_argument("--dataset-seed", type=int, default=42, help="seed of the MNIST1D generator (42 = the standard dataset)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--wandb", default="off", choices=["off", "offline", "online"], help="Weights & Biases logging")
    p.add_argument("--wandb-project", default="diffusion-lab-mnist1d", help="W&B project (or set WANDB_PROJECT)")
    p.add_argument("--resume", action="store_true", help="continue the run in --outdir from its checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--check", action="store_true", help="pre-flight: imports, W&B login, dataset, device, one step; then exit")
    args = p.parse_args(argv)
    if not 0 <= args.label_dropout < 1:
        p.error("--label-dropout must be in [0, 1)")
    if not 0 < args.ema_decay < 1:
        p.error("--ema-decay must be in (0, 1)")
    if args.eval_strata >= args.T:
        p.error("--eval-strata must be smaller than --T")
    if args.sample_steps > args.T:
        p.error("--sample-steps must be at most --T")
    return args


# ----------------------------------------------------------------------------------------------
# model

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
        self.unet = common.UNet1d(1, 1, (width, 2 * width, 2 * width), emb_dim)

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

def forward_loss(process, kind, x0, x0_pred, t):
    """Per-sample forward loss (B,). mse: mean squared error on x0. kl: the variational-bound term
    L_{t-1} (common.vlb_terms, nats) times T, per dimension: an unbiased estimate of the bound's
    sum over t for t ~ U{1..T}, without the terms that carry no gradient (L_T, the decoder's constant)."""
    if kind == "mse":
        return (x0_pred - x0).pow(2).mean(1)
    return process.T * common.vlb_terms(process, x0, x0_pred, t, decoder_constant=False) / x0.shape[1]


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


@torch.no_grad()
def evaluate(model, process, data, args, device):
    """Test metrics on the 1000 test signals, identical t grid and noise for every config.

    t = 1 is evaluated exactly; 2..T is split into --eval-strata strata with one uniform t per
    stratum and signal. Forward metrics use the null label (unconditional denoising).
    test_kl: the variational bound L_T + sum_t L_{t-1} per dimension (nats), stratified estimate."""
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
    sums = {"forward": 0.0, "forward_conditional": 0.0, "inverse": 0.0, "mae": 0.0, "vlb": 0.0}
    forward_by_stratum, stratum_centres = [], []
    for t, size in strata:
        t = t.to(device)
        x_t = common.q_sample(process, x0, t, torch.randn(x0.shape, generator=generator).to(device))
        pred = model(x_t, t, forward_z, no_label)
        forward = (pred - x0).pow(2).mean().item()
        sums["forward"] += size * forward
        sums["mae"] += size * (pred - x0).abs().mean().item()
        sums["forward_conditional"] += size * (model(x_t, t, forward_z, y) - x0).pow(2).mean().item()
        sums["inverse"] += size * (model(x0, t, inverse_z, no_label) - target_inverse).pow(2).mean().item()
        sums["vlb"] += size * common.vlb_terms(process, x0, pred, t).mean().item()
        forward_by_stratum.append(forward)
        stratum_centres.append(t.float().mean().item())
    T = process.T
    metrics = {
        "test_mse_forward": sums["forward"] / T,
        "test_mse_forward_conditional": sums["forward_conditional"] / T,
        "test_mse_inverse": sums["inverse"] / T,
        "test_mae": sums["mae"] / T,
        "test_kl": (sums["vlb"] + common.prior_kl(process, x0).mean().item()) / dims,
        "forward_mse_by_t": {"t": stratum_centres, "mse": forward_by_stratum},
    }
    metrics["test_mse"] = (metrics["test_mse_forward"] + metrics["test_mse_inverse"]) / 2
    return metrics


@torch.no_grad()
def generate(model, process, args, device, seed):
    """Class-wise samples from pure noise with the reverse process. Returns x (N, 40), labels (N,)."""
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.samples_per_class)
    generator = torch.Generator().manual_seed(seed)
    x_T = process.b[-1].item() * torch.randn((len(labels), 40), generator=generator).to(device)
    model_fn = lambda x, t, cond: model(x, t, torch.zeros_like(cond), cond)  # z = 0: the generative direction
    denoise = common.cfg_denoiser(model_fn, labels, torch.full_like(labels, NULL_LABEL), args.guidance_scale)
    sampler = common.SAMPLERS[args.sampler]
    return sampler(denoise, x_T, process, args.sample_steps, generator=generator), labels


@torch.no_grad()
def sample_quality(classifier, samples, labels, reference_features):
    features = classifier.features(samples).cpu().numpy()
    accuracy = (classifier.head(classifier.features(samples)).argmax(1) == labels).float().mean().item()
    return common.frechet_distance(features, reference_features), accuracy


def convergence(train_loss):
    """convergence_rate: r of the least-squares fit log(loss_e) = c - r * e over epochs (per epoch,
    higher = faster). epochs_to_90pct: first epoch whose loss has made 90% of the total decrease."""
    losses = np.asarray(train_loss, dtype=np.float64)
    if len(losses) < 2 or (losses <= 0).any():
        return float("nan"), len(losses)
    rate = -np.polyfit(np.arange(len(losses)), np.log(losses), 1)[0]
    threshold = losses[-1] + 0.1 * (losses[0] - losses[-1])
    return float(rate), int(np.argmax(losses <= threshold)) + 1


# ----------------------------------------------------------------------------------------------
# one configuration, one seed: train (resumable), evaluate, generate

def run_config(name, seed, args, data, classifier, reference_features, device, stop, logger_args):
    loss_kind, noise = name.split("-")[:2]
    training = name.split("-", 2)[2]
    semi_implicit = training == "semi-implicit"
    run_dir = os.path.join(args.outdir, "runs", f"{name}-seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    result_path, checkpoint_path = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "checkpoint.pt")
    if args.resume and os.path.exists(result_path):
        print(f"[{name} seed {seed}] done earlier, loading {result_path}")
        with open(result_path) as file:
            return json.load(file)

    process = common.make_process(noise, args.T, args.schedule)
    torch.manual_seed(seed)
    model = Denoiser(process, args.width).to(device)
    ema = common.EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    x, y = data["x"].to(device), data["y"].to(device)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    generator = torch.Generator().manual_seed(seed)
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "running": {}, "runtime_s": 0.0}
    if args.resume and os.path.exists(checkpoint_path):
        checkpoint = common.load_checkpoint(checkpoint_path, script=SCRIPT, kinds={name})
        common.restore_training_state(checkpoint, checkpoint_path, model, ema, optimizer, generator)
        schedule.load_state_dict(checkpoint["lr_schedule"])
        state = checkpoint["progress"]
        print(f"[{name} seed {seed}] resuming at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    train_model = torch.compile(model) if args.compile else model
    print(f"[{name} seed {seed}] denoiser with {common.count_parameters(model):,} parameters, "
          f"{args.epochs} epochs x {steps_per_epoch} steps on {device}")

    def save(path=checkpoint_path):
        common.save_checkpoint(path, {
            **common.training_state(model, ema, optimizer, generator), "lr_schedule": schedule.state_dict(),
            "progress": state, "config": vars(args),
            "meta": common.checkpoint_meta(SCRIPT, name, seed=seed, width=args.width, T=args.T)})

    logger = common.RunLogger(args.outdir, {**vars(args), "config_name": name, "seed": seed, **logger_args},
                              args.wandb, project=args.wandb_project, group=os.path.basename(os.path.abspath(args.outdir)),
                              name=f"{name}-seed{seed}")
    started = time.time() - state["runtime_s"]
    bar = common.tqdm_maybe(range(state["epoch"] * steps_per_epoch + state["step_in_epoch"], total_steps),
                            not args.no_progress, desc=f"{name} s{seed}", total=total_steps,
                            initial=state["epoch"] * steps_per_epoch + state["step_in_epoch"])
    for global_step in bar:
        epoch, step = divmod(global_step, steps_per_epoch)
        # the epoch's permutation depends only on (seed, epoch), so a resumed run sees the same batches
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        with common.autocast(device):
            loss, parts = training_losses(train_model, process, args, loss_kind, semi_implicit, x[batch], y[batch], generator)
        loss_value = common.finite_loss(loss, f"[{name}] epoch {epoch + 1} step {step}", checkpoint_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update(model)
        for key, value in {"loss": loss_value, **parts}.items():
            state["running"][key] = state["running"].get(key, 0.0) + value
        state["step_in_epoch"] = step + 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if step + 1 == steps_per_epoch:
            means = {key: value / steps_per_epoch for key, value in state["running"].items()}
            state["history"].append(means)
            state.update(epoch=epoch + 1, step_in_epoch=0, running={}, runtime_s=time.time() - started)
            logger.log({"config": name, "seed": seed, "epoch": epoch + 1, "train/loss": means["loss"],
                        **{f"train/{k}": v for k, v in means.items() if k != "loss"},
                        "train/lr": schedule.get_last_lr()[0], "train/grad_norm": grad_norm.item()}, step=global_step + 1)
            save()
        if stop.received:
            state["runtime_s"] = time.time() - started
            save()
            print(f"[{name}] received {stop.received}: checkpoint saved to {checkpoint_path}; "
                  f"rerun with --resume to continue")
            logger.finish()
            sys.exit(0)
    runtime = time.time() - started

    ema_model = ema.model.eval()
    metrics = evaluate(ema_model, process, data, args, device)
    samples, labels = generate(ema_model, process, args, device, seed=seed + 777)
    sample_fd, sample_accuracy = sample_quality(classifier, samples, labels, reference_features)
    train_loss = [epoch_means["loss"] for epoch_means in state["history"]]
    convergence_rate, epochs_to_90pct = convergence(train_loss)
    result = {
        "name": name, "loss": loss_kind, "noise": noise, "training": training, "seed": seed,
        **{k: v for k, v in metrics.items() if k != "forward_mse_by_t"},
        "runtime_s": runtime, "convergence_rate": convergence_rate, "epochs_to_90pct": epochs_to_90pct,
        "train_loss": train_loss,
        "train_components": {k: [e[k] for e in state["history"]] for k in state["history"][0] if k != "loss"} if state["history"] else {},
        "sample_fd": sample_fd, "sample_accuracy": sample_accuracy,
        "forward_mse_by_t": metrics["forward_mse_by_t"],
        "samples": samples[:: args.samples_per_class // 4 or 1].cpu().tolist(),
        "sample_labels": labels[:: args.samples_per_class // 4 or 1].cpu().tolist(),
        "parameters": common.count_parameters(model),
    }
    logger.log({"config": name, "seed": seed, **{f"test/{k}": v for k, v in result.items()
                                                   if isinstance(v, float)}}, step=total_steps)
    logger.finish(result)
    common.write_json(result_path, result)
    print(f"[{name} seed {seed}] test mse fwd {result['test_mse_forward']:.4f} inv {result['test_mse_inverse']:.4f} "
          f"kl {result['test_kl']:.3f} | samples FD {sample_fd:.2f} acc {sample_accuracy:.3f} | {runtime:.0f}s")
    return result


# ----------------------------------------------------------------------------------------------
# aggregation, report, plots

SCALARS = ["test_mse", "test_mse_forward", "test_mse_forward_conditional", "test_mse_inverse", "test_mae", "test_kl",
           "runtime_s", "convergence_rate", "epochs_to_90pct", "sample_fd", "sample_accuracy"]


def aggregate(per_seed):
    """Mean over seeds for every scalar (std beside it), mean curves, and the per-seed results."""
    first = per_seed[0]
    entry = {k: first[k] for k in ("name", "loss", "noise", "training")}
    for key in SCALARS:
        values = np.array([r[key] for r in per_seed], dtype=np.float64)
        entry[key] = float(values.mean())
        entry.setdefault("std", {})[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    entry["train_loss"] = np.mean([r["train_loss"] for r in per_seed], axis=0).tolist()
    entry["train_components"] = {k: np.mean([r["train_components"][k] for r in per_seed], axis=0).tolist()
                                 for k in first["train_components"]}
    entry["forward_mse_by_t"] = {"t": first["forward_mse_by_t"]["t"],
                                 "mse": np.mean([r["forward_mse_by_t"]["mse"] for r in per_seed], axis=0).tolist()}
    entry["seeds"] = [r["seed"] for r in per_seed]
    entry["per_seed"] = [{k: r[k] for k in SCALARS} for r in per_seed]
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
            ax.plot(range(1, len(c["train_loss"]) + 1), c["train_loss"], label=c["name"])
        ax.set(title=f"training loss ({loss_kind})", xlabel="epoch", yscale="log")
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in configs:
        ax.plot(c["forward_mse_by_t"]["t"], c["forward_mse_by_t"]["mse"], label=c["name"])
    ax.axhline(baselines["predict_zero_mse"], color="k", ls="--", label="predict zero")
    ax.axhline(baselines["class_mean_mse"], color="gray", ls=":", label="class mean")
    ax.set(title="forward (denoising) test MSE by timestep", xlabel="t", ylabel="MSE")
    ax.legend(fontsize=6)
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


def write_report(results, plots, outdir):
    configs, baselines, reference = results["configs"], results["baselines"], results["reference"]
    better_baseline = min(baselines["predict_zero_mse"], baselines["class_mean_mse"])
    seeds = len(configs[0]["seeds"])
    pm = (lambda c, k, fmt: f"{c[k]:{fmt}} ± {c['std'][k]:{fmt}}") if seeds > 1 else (lambda c, k, fmt: f"{c[k]:{fmt}}")
    lines = [f"# MNIST1D: implicit vs semi-implicit diffusion training", "",
             f"Dataset {results['dataset']['name']} ({results['dataset']['train']} train / {results['dataset']['test']} test), "
             f"{results['args']['epochs']} epochs per config, {seeds} seed(s), device {results['device']}. "
             f"Test metrics on the {results['dataset']['test']} test signals with the EMA weights.", "",
             "| config | test MSE | forward MSE | inverse MSE | MAE | KL (nats/dim) | sample FD | sample acc | conv. rate | runtime (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        lines.append(f"| {c['name']} | {pm(c, 'test_mse', '.4f')} | {pm(c, 'test_mse_forward', '.4f')} | "
                     f"{pm(c, 'test_mse_inverse', '.4f')} | {pm(c, 'test_mae', '.4f')} | {pm(c, 'test_kl', '.3f')} | "
                     f"{pm(c, 'sample_fd', '.2f')} | {pm(c, 'sample_accuracy', '.3f')} | {pm(c, 'convergence_rate', '.3f')} | "
                     f"{pm(c, 'runtime_s', '.0f')} |")
    lines += ["", "## References", "",
              f"- Forward task, predict zero: MSE {baselines['predict_zero_mse']:.4f}; predict the class mean "
              f"(uses the label): {baselines['class_mean_mse']:.4f}.",
              f"- Inverse task, predict zero: MSE {baselines['inverse_predict_zero_mse']:.4f}; class mean: "
              f"{baselines['inverse_class_mean_mse']:.4f}.",
              f"- Real vs real: classifier-feature FD of 1000 fresh real signals vs the test set {reference['real_fd']:.2f}; "
              f"classifier accuracy on the real test set {reference['real_accuracy']:.3f}.", "",
              "## Verdicts", ""]
    for c in configs:
        ratio = c["test_mse_forward"] / better_baseline
        verdict = "learned (at most half the better trivial baseline)" if ratio <= 0.5 else \
            ("beats the baselines, but by less than 2x" if ratio < 1 else "does NOT beat the trivial baselines")
        lines.append(f"- {c['name']}: forward MSE = {ratio:.2f} x the better trivial baseline: {verdict}; "
                     f"sample FD = {c['sample_fd'] / reference['real_fd']:.1f} x real-vs-real.")
    lines += ["", "## Best config per metric", ""]
    for key, better in [("test_mse", min), ("test_mse_forward", min), ("test_mse_inverse", min), ("test_kl", min),
                        ("sample_fd", min), ("sample_accuracy", max), ("convergence_rate", max), ("runtime_s", min)]:
        best = better(configs, key=lambda c: c[key])
        lines.append(f"- {key}: {best['name']} ({best[key]:.4g})")
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
    print(common.wandb_status())
    device = common.pick_device(args.device)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    data = common.load_mnist1d(args.data_dir, args.dataset_seed)
    print(f"MNIST1D: {len(data['x'])} train / {len(data['x_test'])} test signals, cached in {args.data_dir}")
    process = common.make_process("gaussian", args.T, args.schedule)
    model = Denoiser(process, args.width).to(device)
    loss, _ = training_losses(model, process, args, "kl", True, data["x"][:8].to(device), data["y"][:8].to(device),
                              torch.Generator().manual_seed(0))
    loss.backward()
    print(f"one semi-implicit KL training step: loss {loss.item():.3f}, gradients finite: "
          f"{all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)}")
    print(f"pre-flight passed in {time.time() - started:.1f}s")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return preflight(args)
    device = common.pick_device(args.device)
    common.prepare_outdir(args.outdir)
    if not args.resume and os.path.isdir(os.path.join(args.outdir, "runs")) and os.listdir(os.path.join(args.outdir, "runs")):
        raise common.UserError(f"{args.outdir} already holds a run; pass --resume to continue it, or choose another --outdir")

    data = common.load_mnist1d(args.data_dir, args.dataset_seed)
    fresh = common.load_mnist1d(args.data_dir, args.dataset_seed + 1)  # unseen real signals for the real-vs-real FD
    dataset = {"name": "mnist1d", "train": len(data["x"]), "test": len(data["x_test"]), "classes": NUM_CLASSES,
               "seed": args.dataset_seed}
    common.write_json(os.path.join(args.outdir, "config.json"), {**vars(args), "dataset": dataset, "device": str(device)})
    classifier, classifier_accuracy = load_or_train_classifier(data, args.data_dir, args.dataset_seed, device)
    with torch.no_grad():
        reference_features = classifier.features(data["x_test"].to(device)).cpu().numpy()
        real_fd = common.frechet_distance(classifier.features(fresh["x_test"].to(device)).cpu().numpy(), reference_features)
    baselines = trivial_baselines(data)
    print(f"baselines: predict-zero MSE {baselines['predict_zero_mse']:.4f}, class-mean MSE {baselines['class_mean_mse']:.4f}; "
          f"real-vs-real FD {real_fd:.2f}, classifier test accuracy {classifier_accuracy:.3f}")
    plots = [plot_prime_inverses(data, args.outdir)]

    stop = common.StopSignal()
    configs = []
    for name in args.configs:
        per_seed = [run_config(name, seed, args, data, classifier, reference_features, device, stop, {"dataset": dataset})
                    for seed in range(args.seed, args.seed + args.seeds)]
        configs.append(aggregate(per_seed))
    stop.close()

    results = {"configs": configs, "baselines": baselines,
               "reference": {"real_fd": real_fd, "real_accuracy": classifier_accuracy},
               "dataset": dataset, "device": str(device), "torch": torch.__version__, "args": vars(args)}
    plots += plot_all(results, args.outdir)
    write_report(results, plots, args.outdir)
    common.write_json(os.path.join(args.outdir, "results.json"), results)
    print(f"wrote {os.path.join(args.outdir, 'results.json')} and report.md")
    return results


if __name__ == "__main__":
    common.run_main(main)
