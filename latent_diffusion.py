"""Latent diffusion on MNIST: a DDPM in the 16-D latent space of a frozen autoencoder (SPEC section 2).

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models") in miniature: encode
the training images with the autoencoder from autoencoders.py, normalise the latents per dimension, and
train an MLP denoiser with FiLM time conditioning to predict the noise (Ho et al. 2020, Eq. 14).
Samples are drawn in latent space with any sampler of common.py and decoded to images.

    python autoencoders.py --model conv --outdir runs/ae-conv
    python latent_diffusion.py --ae-ckpt runs/ae-conv/ae-conv.pt --outdir runs          # 125 epochs (~8.5 min), then eval
    python latent_diffusion.py --ae-ckpt-dir runs --only-digit 7 --generate-images      # newest AE under runs/
    python latent_diffusion.py --ae-ckpt runs/ae-conv/ae-conv.pt --auto-resume          # continue a killed run
    python latent_diffusion.py generate --ckpt runs/<run>/checkpoints/last.pt --num-images 64 \\
        --output generated.png --sampler dpmpp --steps 20

A run lives in <outdir>/<run name>, e.g. runs/latent-diffusion-dall-bs512-lr0.002-T1000-seed42-20250101-120000/:
config.json, results.json, checkpoints/{last,best}.pt, samples/*.png, logs/metrics.jsonl.
Validation loss, early stopping and best.pt use a fixed split of the training set (10% of each digit);
the test set is touched only by the final metrics.
results.json holds the AE reconstruction MSE and, for N decoded samples (DPM-Solver++, 20 steps), the
classifier Frechet distance to the test images and the class distribution (or, with --only-digit d, the
share classified as d), beside the same metrics, with the same N, for decoded encodings of N training
images (the autoencoder's ceiling: a perfect latent model) and for N real training images (real vs real).
"""
import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import autoencoders
import common
from common import UserError

SCRIPT = "latent_diffusion"
KIND = "latent-denoiser"
# settings that define a run: --auto-resume only continues a run whose config matches on all of them
# (and on --epochs too with the cosine schedule, whose shape depends on it)
RUN_IDENTITY = ("ae_ckpt", "only_digit", "batch_size", "lr", "lr_schedule", "T", "beta_start", "beta_end",
                "hidden_dim", "num_blocks", "ema_decay", "seed", "dataset_used", "validation_split")


# ----------------------------------------------------------------------------------------------
# model

class FiLMBlock(nn.Module):
    """Residual MLP block: h + Linear(SiLU(FiLM(LayerNorm(h), emb))). (B, H) -> (B, H)."""

    def __init__(self, hidden_dim, emb_dim):
        super().__init__()
        self.film = common.FiLM(emb_dim, hidden_dim, nn.LayerNorm(hidden_dim))
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h, emb):
        return h + self.linear(F.silu(self.film(h, emb)))


class LatentDenoiser(nn.Module):
    """eps_theta(z_t, t): an MLP on latents with FiLM time conditioning.

    sinusoidal embedding of t -> time MLP -> (gamma, beta) of every block's FiLM. (B, D), (B,) -> (B, D)."""

    def __init__(self, latent_dim=16, hidden_dim=256, num_blocks=4, time_dim=128):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.input = nn.Linear(latent_dim, hidden_dim)
        self.blocks = nn.ModuleList(FiLMBlock(hidden_dim, hidden_dim) for _ in range(num_blocks))
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, latent_dim))

    def forward(self, z_t, t):
        # sampling (eval mode) passes one time for the whole batch: embed it once. Not in training, where the
        # check would cost a device sync per step and a graph break under torch.compile.
        if not self.training and t.numel() > 1 and bool((t == t[0]).all()):
            emb = self.time_mlp(common.timestep_embedding(t[:1], self.time_dim)).expand(len(t), -1)
        else:
            emb = self.time_mlp(common.timestep_embedding(t, self.time_dim))  # (B, H)
        h = self.input(z_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(h)


def x0_denoiser(model, process, bound=None):
    """The samplers of common.py take x0 predictions; the model predicts eps, so
    x0_hat = (z_t - b_t eps_hat) / a_t (Ho et al. 2020, Eq. 4 solved for x0).

    With `bound` (D,), x0_hat is clipped to [-bound, bound] ("static thresholding", Saharia et al. 2022):
    at large t, 1/a_t (about 160 for the linear schedule) amplifies eps errors, and DPM-Solver++ would
    otherwise turn a few of them into far-out latents that decode to blobs."""
    def denoise(z_t, t):
        eps_hat = model(z_t, t).float()
        a_t, b_t = common.at_timestep(process.a, t, z_t), common.at_timestep(process.b, t, z_t)  # (B, 1)
        x0_hat = (z_t - b_t * eps_hat) / a_t
        return x0_hat if bound is None else torch.clamp(x0_hat, -bound, bound)
    return denoise


@torch.no_grad()
def sample_latents(model, process, stats, count, sampler="ddpm", steps=1000, seed=0, batch_size=5000, device="cpu",
                   progress=False):
    """`count` normalised latents (count, D) from N(0, I) noise through a common.py sampler."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    denoise = x0_denoiser(model, process, stats["bound"])
    dim = model.input.in_features
    out = []
    for start in range(0, count, batch_size):
        noise = torch.randn(min(batch_size, count - start), dim, generator=generator, device=device)
        out.append(common.SAMPLERS[sampler](denoise, noise * process.b[-1].item(), process, steps,
                                            generator=generator, progress=progress))
    return torch.cat(out)


@torch.no_grad()
def decode_latents(autoencoder, normalised, stats, batch_size=1000):
    """Undo the latent normalisation and decode: (N, D) -> images (N, 1, 28, 28) in [0, 1]."""
    latents = normalised * stats["std"] + stats["mean"]
    return torch.cat([autoencoder.decode(latents[i:i + batch_size]).float() for i in range(0, len(latents), batch_size)])


def load_denoiser(path, device):
    """The EMA denoiser, its process, latent statistics {mean, std, bound} and metadata from a checkpoint."""
    state = common.load_checkpoint(path, script=SCRIPT, kinds={KIND})
    meta = state["meta"]
    model = LatentDenoiser(**meta["args"])
    common.load_model_state(model, state["ema"]["model"], path)
    if meta["T"] != 1000 and meta.get("beta_scaling") != "1000/T":  # saved before the betas were scaled by 1000/T
        raise UserError(f"{path} was trained with T = {meta['T']} and unscaled linear betas, a process this version "
                        "no longer builds; retrain it (at T = 1000 both versions agree)")
    process = common.gaussian_process(meta["T"], "linear", meta["beta_start"], meta["beta_end"])
    stats = {key: value.to(device) for key, value in state["latent_stats"].items()}
    return model.to(device).eval(), process, stats, meta


# ----------------------------------------------------------------------------------------------
# data: encoded latents, cached per (AE checkpoint contents, dataset)

def encoded_latents(autoencoder, data, ae_path, cache_dir, device):
    """Latents of train and test images (N, D), cached in cache_dir keyed by the AE file's SHA-256."""
    path = os.path.join(cache_dir, f"latents-{data['name']}-{common.file_sha256(ae_path)[:16]}.pt") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            cached = torch.load(path, map_location=device, weights_only=True)
            if cached["train"].shape[0] == data["train_size"] and cached["test"].shape[0] == data["test_size"]:
                print(f"latents from cache {path}")
                return cached["train"], cached["test"]
        except Exception as error:
            print(f"latent cache {path} unreadable ({type(error).__name__}); re-encoding")
    train = autoencoders.encode_all(autoencoder, data["x"])
    test = autoencoders.encode_all(autoencoder, data["x_test"])
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            common.save_checkpoint(path, {"train": train.cpu(), "test": test.cpu()})
        except OSError as error:
            print(f"could not write the latent cache in --cache-dir {cache_dir} ({error.strerror}); continuing")
    return train, test


VALIDATION_FRACTION, VALIDATION_SEED = 0.1, 0  # the split is a property of the data, not of --seed


def validation_mask(labels):
    """A fixed, seeded, stratified split of the training set: VALIDATION_FRACTION of each digit, (N,) bool."""
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    on_cpu = labels.cpu()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        members = torch.nonzero(on_cpu == digit)[:, 0]
        chosen = members[torch.randperm(len(members), generator=generator)[:round(VALIDATION_FRACTION * len(members))]]
        mask[chosen] = True
    return mask.to(labels.device)


def latent_splits(autoencoder, data, ae_path, cache_dir, only_digit, device):
    """Training and validation latents (N, D) and the training and test images (N, 1, 28, 28) the final
    evaluation compares with, all of `only_digit` if given. Validation is carved from train (validation_mask);
    test latents are not used at all."""
    train_latents, _ = encoded_latents(autoencoder, data, ae_path, cache_dir, device)
    validation = validation_mask(data["y"])
    keep_train, keep_validation, keep_test = ~validation, validation.clone(), torch.ones_like(data["y_test"], dtype=torch.bool)
    if only_digit is not None:
        keep_train &= data["y"] == only_digit
        keep_validation &= data["y"] == only_digit
        keep_test &= data["y_test"] == only_digit
    return {"train_latents": train_latents[keep_train], "validation_latents": train_latents[keep_validation],
            "train_images": data["x"][keep_train], "test_images": data["x_test"][keep_test]}


# ----------------------------------------------------------------------------------------------
# evaluation: samples scored by the MNIST classifier

def sample_metrics(classifier, images, reference_features, target_digit=None):
    """Classifier Frechet distance to reference features (N_ref, 128), class distribution (10 shares),
    and with target_digit the share classified as that digit. images: (N, 1, 28, 28) in [0, 1].

    When the distance cannot be computed (fewer than 2 images, non-finite features), 'fd' is None and
    'fd_unavailable' says why: the caller reports it instead of crashing."""
    features, predictions = common.classifier_outputs(classifier, images)
    counts = torch.bincount(predictions, minlength=10).float()
    fd, reason = common.frechet_distance_or_reason(features.cpu().numpy(), reference_features.cpu().numpy())
    metrics = {"fd": fd, "class_distribution": (counts / counts.sum().clamp(min=1)).tolist()}
    if reason is not None:
        metrics["fd_unavailable"] = reason
    if target_digit is not None:
        metrics["digit_accuracy"] = (predictions == target_digit).float().mean().item()
    return metrics


# ----------------------------------------------------------------------------------------------
# training

def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ae-ckpt", help="autoencoder checkpoint written by autoencoders.py (kind read from it)")
    source.add_argument("--ae-ckpt-dir", help="use the newest AE checkpoint under this directory (conv before mlp)")
    data = parser.add_argument_group("data").add_argument
    data("--only-digit", type=int, choices=range(10), default=None, metavar="{0..9}",
         help="train on the latents of this digit only")
    data("--dataset", choices=common.DATASETS, default="auto",
         help="mnist (full, fetched once), mnist5k (offline subset), auto (full if possible)")
    data("--data-dir", default="./data", help="where MNIST and the cached classifier live")
    data("--cache-dir", default="./cache", help="cache of encoded latents ('' = no cache)")
    model = parser.add_argument_group("model").add_argument
    model("--T", type=common.positive_int, default=1000, help="diffusion steps")
    model("--beta-start", type=common.positive_float, default=1e-4,
          help="first beta of the linear schedule at T = 1000 (scaled by 1000/T)")
    model("--beta-end", type=common.positive_float, default=2e-2,
          help="last beta of the linear schedule at T = 1000 (scaled by 1000/T)")
    model("--hidden-dim", type=common.positive_int, default=256, help="denoiser MLP width")
    model("--num-blocks", type=common.positive_int, default=4, help="FiLM residual blocks in the denoiser")
    training = parser.add_argument_group("training").add_argument
    training("--epochs", type=common.positive_int, default=125,
             help="training epochs (125: about 8.5 minutes on a 2-core CPU, see docs/latent_diffusion.md)")
    training("--batch-size", type=common.positive_int, default=512,
             help="batch size (512: 2.3x the latents per second of 128 on a 2-core CPU)")
    training("--lr", type=common.positive_float, default=2e-3, help="peak Adam learning rate")
    training("--lr-schedule", choices=("constant", "cosine"), default="cosine",
             help="constant, or cosine decay from --lr to 0 over the run")
    training("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (with warm-up)")
    training("--early-stopping-patience", type=int, default=0,
             help="stop after this many epochs without a better validation loss (0 = never)")
    training("--seed", type=int, default=42, help="random seed (same seed on CPU -> same numbers)")
    evaluation = parser.add_argument_group("evaluation").add_argument
    evaluation("--samples-per-epoch", type=common.positive_int, default=16,
               help="images in each epoch's sample grid (with --generate-images)")
    evaluation("--generate-images", action="store_true", help="write samples/epoch-NNN.png after every epoch")
    evaluation("--eval-samples", type=int, default=None,
               help="N, the decoded samples scored at the end; every reference FD uses the same N (default: "
                    "as many as there are test images to compare with, at most 10,000; 0 = skip sample metrics)")
    evaluation("--eval-sampler", choices=sorted(common.SAMPLERS), default="dpmpp",
               help="sampler for the final evaluation")
    evaluation("--eval-steps", type=common.positive_int, default=None,
               help="sampler steps for the evaluation (default: 20, or T if smaller)")
    system = parser.add_argument_group("system").add_argument
    system("--auto-resume", "--resume", action="store_true",
           help="continue the newest run in --outdir with the same settings, if there is one")
    system("--run-name", default=None, help="run directory name (default: built from the settings + time)")
    system("--outdir", default="runs", help="directory that holds the run directories")
    common.add_training_system_flags(system, compiled="denoiser")
    args = parser.parse_args(argv)
    if not 0 < args.beta_start < args.beta_end < 1:
        parser.error(f"need 0 < --beta-start < --beta-end < 1, got {args.beta_start}, {args.beta_end}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.eval_samples is not None and (args.eval_samples < 0 or args.eval_samples == 1):
        parser.error(f"--eval-samples must be 0 (no sample metrics) or >= 2 (a Frechet distance needs two), "
                     f"got {args.eval_samples}")
    if args.early_stopping_patience < 0:
        parser.error(f"--early-stopping-patience must be >= 0, got {args.early_stopping_patience}")
    if args.run_name is not None and (not args.run_name or os.sep in args.run_name or args.run_name in (".", "..")):
        parser.error(f"--run-name must be a plain directory name, got {args.run_name!r}")
    args.eval_steps = args.eval_steps or min(20, args.T)
    if args.eval_steps > args.T:
        parser.error(f"--eval-steps must be <= --T ({args.T}), got {args.eval_steps}")
    return args


def run_prefix(args):
    digit = "dall" if args.only_digit is None else f"d{args.only_digit}"
    return f"latent-diffusion-{digit}-bs{args.batch_size}-lr{args.lr:g}-T{args.T}-seed{args.seed}"


def find_resumable_run(args, identity):
    """(run directory, None) for the newest run under --outdir (named --run-name, or any latent-diffusion-* run)
    with checkpoints/last.pt and the same identity settings; else (None, one phrase saying why not)."""
    keys = RUN_IDENTITY + (("epochs",) if identity["lr_schedule"] == "cosine" else ())
    pattern = args.run_name or "latent-diffusion-*"
    last = lambda directory: os.path.join(directory, "checkpoints", "last.pt")
    runs = sorted((d for d in glob.glob(os.path.join(args.outdir, pattern))
                   if os.path.isfile(last(d)) and os.path.isfile(os.path.join(d, "config.json"))),
                  key=lambda d: os.path.getmtime(last(d)), reverse=True)
    if not runs:
        return None, f"no run named {pattern} with checkpoints/last.pt under {args.outdir}"
    differences = []
    for directory in runs:
        try:
            with open(os.path.join(directory, "config.json")) as file:
                config = json.load(file)
        except (OSError, ValueError):
            continue
        differ = [key for key in keys if config.get(key) != identity[key]]
        if not differ:
            return directory, None
        differences.append((directory, config, differ))
    if not differences:
        return None, f"the config.json of every run named {pattern} under {args.outdir} is unreadable"
    directory, config, differ = differences[0]
    detail = ", ".join(f"{key} {config.get(key)!r} there, {identity[key]!r} now" for key in differ)
    return None, (f"{len(runs)} run(s) named {pattern} under {args.outdir}, none with these settings; "
                  f"the newest, {os.path.basename(directory)}, differs in {detail}")


def repair_best_checkpoint(last_state, last_path, best_path):
    """Make best.pt agree with last.pt on resume. At the end of an improving epoch last.pt and then best.pt are
    written with the same contents; a kill between the two writes leaves best.pt an older epoch (or missing)
    while last.pt already records this epoch as the best. Then last.pt *is* the best checkpoint: copy it."""
    epoch, best_epoch = last_state["epoch"], last_state["best_epoch"]
    if not (best_epoch == epoch > 0 and last_state["batch_index"] == 0):
        return
    try:
        best_held = common.load_checkpoint(best_path, script=SCRIPT, kinds={KIND})["epoch"]
    except UserError:
        best_held = None  # missing or unreadable
    if best_held != epoch:
        common.save_checkpoint(best_path, last_state)
        print(f"best.pt held {'no usable checkpoint' if best_held is None else f'epoch {best_held}'} while last.pt "
              f"records epoch {epoch} as the best (a stop between the two writes): rewrote it from last.pt")


def normalised_latents(splits):
    """(stats, train_z (N_train, D), validation_z (N_val, D)): the latents normalised per dimension with the
    training split's mean and std; stats also holds `bound`, the largest |z| of a training latent per
    dimension, where sampling clips x0_hat."""
    stats = {"mean": splits["train_latents"].mean(0), "std": splits["train_latents"].std(0)}  # (D,) each
    train_z = (splits["train_latents"] - stats["mean"]) / stats["std"]
    validation_z = (splits["validation_latents"] - stats["mean"]) / stats["std"]
    stats["bound"] = train_z.abs().max(0).values  # (D,)
    return stats, train_z, validation_z


def eps_loss(forward, process, z0, generator, amp):
    """The eps-prediction MSE (Ho et al. 2020, Alg. 1) of a batch of latents z0 (B, D), t ~ U{1..T}."""
    t = torch.randint(1, process.T + 1, (len(z0),), generator=generator).to(z0.device)   # (B,)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)                    # (B, D)
    with common.autocast(z0.device, amp):
        return F.mse_loss(forward(common.q_sample(process, z0, t, noise), t).float(), noise)


def validation_loss(model, process, validation_z, t, noise):
    """The eps-MSE of `model` on the validation latents at fixed (t, noise): comparable across epochs."""
    with torch.no_grad():
        return F.mse_loss(model(common.q_sample(process, validation_z, t, noise), t), noise).item()


def open_run_directory(args, config):
    """(run directory, resumed?): the run --auto-resume finds with these settings, else a new directory (its
    checkpoints/, samples/, logs/ made), which must not hold a checkpoint already."""
    resumable, why_not = find_resumable_run(args, config) if args.auto_resume else (None, None)
    if args.auto_resume and resumable is None:
        print(f"--auto-resume: nothing resumed ({why_not}); starting a new run")
    run_dir = resumable or os.path.join(args.outdir, args.run_name or f"{run_prefix(args)}-{time.strftime('%Y%m%d-%H%M%S')}")
    for sub in ("checkpoints", "samples", "logs"):
        common.prepare_outdir(os.path.join(run_dir, sub))
    last_path = os.path.join(run_dir, "checkpoints", "last.pt")
    if resumable is None and os.path.isfile(last_path):
        raise UserError(f"{last_path} exists" + (f" but cannot be continued: {why_not}" if args.auto_resume else
                                                 "; pass --auto-resume to continue that run") + "; or pick another --run-name")
    return run_dir, resumable is not None


def learning_rate(args, step, total_steps):
    """--lr at `step`, constant or cosine-decayed to 0 at total_steps: a function of the step alone, so
    resuming needs no scheduler state."""
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    return args.lr


def train_epoch(forward, model, ema, optimizer, process, train_z, generator, progress, args, total_steps, logger,
                stop, checkpoint_path):
    """The rest of epoch progress['epoch'], from batch progress['batch_index'], in a batch order fixed by the
    seed and the epoch; progress['step'] and ['batch_index'] advance, and at the epoch's end ['epoch'] does
    (['batch_index'] reset). Stops after the step in which a stop signal came. Returns (the last batch's loss,
    stopped?)."""
    model.train()
    epoch, steps_per_epoch = progress["epoch"], (len(train_z) + args.batch_size - 1) // args.batch_size
    order = torch.randperm(len(train_z), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(train_z.device)
    last_loss = float("nan")
    bar = tqdm(range(progress["batch_index"], steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=args.no_progress, mininterval=1.0, leave=False)
    for batch_index in bar:
        z0 = train_z[order[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]]  # (B, D)
        step = progress["step"]
        loss = eps_loss(forward, process, z0, generator, args.amp)
        last_loss = common.finite_loss(loss, f"step {step}", checkpoint_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step, total_steps)
        optimizer.step()
        ema.update(model)
        progress["step"], progress["batch_index"] = step + 1, batch_index + 1
        bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
        if (step + 1) % args.log_every == 0:
            logger.log({"train/loss": last_loss, "train/learning_rate": learning_rate(args, step, total_steps),
                        "progress/epoch": epoch + (batch_index + 1) / steps_per_epoch}, step=step + 1)
        if stop.received:
            return last_loss, True
    progress["epoch"], progress["batch_index"] = epoch + 1, 0
    return last_loss, False


def open_autoencoder(args, device):
    """(its absolute path, the autoencoder, its checkpoint's metadata, which gives its kind and constructor args):
    --ae-ckpt, else the newest conv checkpoint in --ae-ckpt-dir."""
    ae_path = os.path.abspath(args.ae_ckpt or autoencoders.find_autoencoder_checkpoint(args.ae_ckpt_dir))
    autoencoder, ae_meta = autoencoders.load_autoencoder(ae_path, device)
    print(f"autoencoder: {ae_meta['kind']} {ae_meta['args']} from {ae_path}")
    if ae_meta.get("finished") is False:
        print(f"note: this autoencoder is {autoencoders.checkpoint_status(ae_meta)}; its latent space may be poor "
              f"(finish it with autoencoders.py --resume)")
    return ae_path, autoencoder, ae_meta


def build_model(args, latent_dim, device):
    """(model_args, the LatentDenoiser, its EMA, Adam, what training calls: the model, compiled with --compile),
    the weights drawn from --seed."""
    torch.manual_seed(args.seed)
    model_args = {"latent_dim": latent_dim, "hidden_dim": args.hidden_dim, "num_blocks": args.num_blocks}
    model = LatentDenoiser(**model_args).to(device)
    ema = common.EMA(model, args.ema_decay)
    # fused: one kernel for the whole update instead of a dozen per tensor; this MLP's steps are short enough
    # on a CPU that the optimiser's overhead shows (about 20% of a step at batch 128)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    forward = torch.compile(model) if args.compile else model
    return model_args, model, ema, optimizer, forward


def open_run(args, config, run_dir, resumable, model, ema, optimizer, generator):
    """(progress, the RunLogger): a new run's progress, or the stopped run's restored from its last.pt into model,
    EMA, optimiser and generator (and its best.pt repaired); config.json written, the logs cut back to the
    checkpoint."""
    last_path, best_path = os.path.join(run_dir, "checkpoints", "last.pt"), os.path.join(run_dir, "checkpoints", "best.pt")
    progress = {"epoch": 0, "batch_index": 0, "step": 0, "elapsed": 0.0, "best_epoch": 0, "best_val": float("inf"),
                "epochs_without_improvement": 0}          # saved with every checkpoint, restored on resume
    if resumable:
        state = common.load_checkpoint(last_path, script=SCRIPT, kinds={KIND})
        common.restore_training_state(state, last_path, model, ema, optimizer, generator)
        progress = {key: state[key] for key in progress}
        print(f"resuming {run_dir} at epoch {progress['epoch']}, step {progress['step']}")
        repair_best_checkpoint(state, last_path, best_path)
    print(f"run directory: {run_dir}")
    common.write_json(os.path.join(run_dir, "config.json"), config)
    logger = common.RunLogger(os.path.join(run_dir, "logs"), config, args.wandb, name=os.path.basename(run_dir),
                              resume=resumable)
    if resumable:
        logger.truncate_after(progress["step"])  # the steps after the checkpoint are logged again by this run
    return progress, logger


def validation_set(validation_z, seed, T, device):
    """(validation latents (V, D), t (V,), noise (V, D)): fixed noise, so that the EMA model's eps-MSE on the
    validation latents is comparable across epochs."""
    validation_generator = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(1, T + 1, (len(validation_z),), generator=validation_generator).to(device)
    noise = torch.randn(validation_z.shape, generator=validation_generator).to(device)
    return validation_z, t, noise


def validate_epoch(ema, process, validation, progress, last_loss, args, logger):
    """The EMA model's validation eps-MSE after epoch progress['epoch'], logged and printed, and the best epoch
    (and early stopping's count) updated in progress; returns whether it improved on the best."""
    epoch = progress["epoch"]
    val = validation_loss(ema.model, process, *validation)
    improved = val < progress["best_val"]
    if improved:
        progress.update(best_val=val, best_epoch=epoch, epochs_without_improvement=0)
    else:
        progress["epochs_without_improvement"] += 1
    logger.log({"val/eps_mse_ema": val, "progress/epoch": epoch, "time/elapsed_s": progress["elapsed"]},
               step=progress["step"])
    print(f"epoch {epoch}/{args.epochs}: train loss {last_loss:.4f}, validation eps-MSE (EMA) {val:.4f} "
          f"({progress['elapsed']:.0f} s)")
    return improved


def save_sample_grid(name, count, ema, process, stats, autoencoder, run_dir, args, logger, progress):
    """`count` decoded samples of the EMA model (DPM-Solver++, 20 steps) as samples/<name>, logged at the current
    step; returns the path."""
    z = sample_latents(ema.model, process, stats, count, "dpmpp", min(20, args.T), seed=args.seed, device=stats["mean"].device)
    path = common.save_image_grid(os.path.join(run_dir, "samples", name), decode_latents(autoencoder, z, stats), nrow=8)
    logger.log_image(f"samples/{name}", path, caption=f"epoch {progress['epoch']}, DPM-Solver++ 20 steps",
                     step=progress["step"])
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:
        return generate(argv[1:])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    common.prepare_outdir(args.outdir)
    process = common.gaussian_process(args.T, "linear", args.beta_start, args.beta_end)

    ae = ae_path, autoencoder, ae_meta = open_autoencoder(args, device)

    # data: full dataset as tensors, encoded once (cached); a fixed validation split carved from train;
    # latents normalised per dimension with the training split's statistics
    data = common.load_mnist(args.dataset, args.data_dir, device)
    splits = latent_splits(autoencoder, data, ae_path, args.cache_dir, args.only_digit, device)
    stats, train_z, validation_z = normalised_latents(splits)
    latent_dim = train_z.shape[1]
    eval_samples = min(10000, len(splits["test_images"])) if args.eval_samples is None else args.eval_samples
    classifier = common.load_mnist_classifier(data, args.data_dir, device) if eval_samples else None  # before training

    # model, optimiser, EMA
    model_args, model, ema, optimizer, forward = build_model(args, latent_dim, device)
    print(f"latent denoiser: {common.count_parameters(model):,} parameters; {len(train_z)} training latents of dim "
          f"{latent_dim}, {len(validation_z)} validation latents (held out from train)")

    config = {**vars(args), "eval_samples": eval_samples, "ae_ckpt": ae_path, "ae_kind": ae_meta["kind"],
              "ae_args": ae_meta["args"], "ae_finished": ae_meta.get("finished"), "dataset_used": data["name"],
              "validation_split": f"{VALIDATION_FRACTION:g} of each digit of train, seed {VALIDATION_SEED}",
              "train_size": len(train_z), "validation_size": len(validation_z),
              "test_size": len(splits["test_images"]), "parameters": common.count_parameters(model)}
    run_dir, resumable = open_run_directory(args, config)
    last_path, best_path = os.path.join(run_dir, "checkpoints", "last.pt"), os.path.join(run_dir, "checkpoints", "best.pt")
    config["run_dir"] = run_dir
    meta = common.checkpoint_meta(SCRIPT, KIND, args=model_args, T=args.T, beta_scaling="1000/T",
                                  beta_start=args.beta_start, beta_end=args.beta_end, ae_ckpt=ae_path, ae_kind=ae_meta["kind"],
                                  only_digit=args.only_digit, dataset=data["name"])

    # training randomness (batch order aside) comes from one generator whose state is checkpointed
    generator = torch.Generator().manual_seed(args.seed)
    total_steps = args.epochs * ((len(train_z) + args.batch_size - 1) // args.batch_size)

    progress, logger = open_run(args, config, run_dir, resumable, model, ema, optimizer, generator)
    validation = validation_set(validation_z, args.seed, args.T, device)

    def save(path):
        common.save_checkpoint(path, {**common.training_state(model, ema, optimizer, generator), **progress,
                                      "latent_stats": {key: value.cpu() for key, value in stats.items()},
                                      "config": config, "meta": meta})

    # training loop: eps-prediction MSE (Ho et al. 2020, Alg. 1) on normalised latents, validated every epoch
    stop = common.StopSignal()
    started = time.time() - progress["elapsed"]
    try:
        while progress["epoch"] < args.epochs:
            last_loss, stopped = train_epoch(forward, model, ema, optimizer, process, train_z, generator, progress, args,
                                             total_steps, logger, stop, last_path)
            progress["elapsed"] = time.time() - started
            if stopped:
                save(last_path)
                print(f"{stop.received} received: saved {last_path} at step {progress['step']}; rerun with --auto-resume")
                logger.finish()  # the W&B run is continued by the resumed run (same id)
                return
            improved = validate_epoch(ema, process, validation, progress, last_loss, args, logger)
            if args.generate_images:
                save_sample_grid(f"epoch-{progress['epoch']:03d}.png", args.samples_per_epoch, ema, process, stats,
                                 autoencoder, run_dir, args, logger, progress)
            save(last_path)
            if improved:  # a kill between these two writes is repaired on resume (repair_best_checkpoint)
                save(best_path)
            if args.early_stopping_patience and progress["epochs_without_improvement"] >= args.early_stopping_patience:
                print(f"early stopping: no better validation loss for {progress['epochs_without_improvement']} epochs")
                break
    finally:
        stop.close()
    return final_evaluation(args, run_dir, data, splits, classifier, eval_samples, ae, ema, process, stats, progress,
                            logger, device)


def final_evaluation(args, run_dir, data, splits, classifier, eval_samples, ae, ema, process, stats, progress, logger,
                     device):
    """The final EMA model's grid and evaluation, everything beside its reference (ae: the autoencoder's path,
    model and metadata), in results.json and the W&B summary; returns the results."""
    ae_path, autoencoder, ae_meta = ae
    results = {"run_dir": run_dir, "dataset": data["name"], "only_digit": args.only_digit, "epochs": progress["epoch"],
               "steps": progress["step"], "train_time_s": progress["elapsed"], "best_val_eps_mse": progress["best_val"],
               "best_epoch": progress["best_epoch"],
               "autoencoder": {"checkpoint": ae_path, "kind": ae_meta["kind"], "finished": ae_meta.get("finished"),
                               "test_reconstruction_mse": autoencoders.reconstruction_mse(autoencoder, data["x_test"])}}
    print(f"AE test reconstruction MSE {results['autoencoder']['test_reconstruction_mse']:.5f}")
    results["samples_png"] = save_sample_grid("final.png", 64, ema, process, stats, autoencoder, run_dir, args, logger,
                                              progress)
    if eval_samples:
        results["evaluation"] = evaluate_samples(
            ema.model, process, autoencoder, stats, splits, classifier, args.only_digit, eval_samples,
            args.eval_sampler, args.eval_steps, args.seed, device, progress=not args.no_progress,
            ae_reconstruction_mse=results["autoencoder"]["test_reconstruction_mse"])
    common.write_json(os.path.join(run_dir, "results.json"), results)
    logger.log({f"final/{k}": v for k, v in flatten(results).items() if isinstance(v, (int, float))}, step=progress["step"])
    logger.finish(flatten(results))
    print(f"wrote {os.path.join(run_dir, 'results.json')}")
    return results


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


# The autoencoder's ceiling is "far from real data", so that no FD ratio of the run may be read as a good
# result, when its test reconstruction MSE is above the conv AE's target (0.015, BENCHMARKS.md) or when decoded
# training latents score more than AE_CEILING_MAX_FACTOR times the real-vs-real FD at the same N. For scale
# (BENCHMARKS.md): full MNIST, N = 10,000, the 10-epoch conv AE's ceiling is 5.0x real vs real (8.98 / 1.80);
# mnist5k, N = 500, a 20-epoch conv AE's is 3.6x and a 2-epoch one's 72x.
AE_MAX_RECONSTRUCTION_MSE, AE_CEILING_MAX_FACTOR = 0.015, 10.0


def fd_ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator is not None and denominator > 0 else None


def evaluate_samples(model, process, autoencoder, stats, splits, classifier, only_digit, count, sampler, steps,
                     seed, device, progress=False, ae_reconstruction_mse=None):
    """Classifier Frechet distance (FD) and class shares of N decoded samples against the test images (of
    `only_digit` if given), beside the same metrics with the same N for
      decoded_train_latents  decode(encode(x)) of N training images: what a perfect latent model would score,
                             the autoencoder's ceiling;
      real_train_images      those N training images themselves: real vs real, the finite-sample floor.
    N = count, capped at the number of training images. The headline is FD(samples) / FD(decoded_train_latents).
    splits: latent_splits(...); a FD that cannot be computed is None with the reason beside it."""
    train_images = splits["train_images"]
    n = min(count, len(train_images))
    if n < count:
        print(f"evaluation: N = {n}, not {count}: every reference needs N training images and there are {n}")
    reference, _ = common.classifier_outputs(classifier, splits["test_images"])
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n].to(train_images.device)
    start = time.time()
    z = sample_latents(model, process, stats, n, sampler, steps, seed=seed + 2, device=device, progress=progress)
    samples = decode_latents(autoencoder, z, stats)
    sampling_s = time.time() - start
    train_z = (splits["train_latents"][pick] - stats["mean"]) / stats["std"]  # (N, D), decoded exactly as samples are
    metrics = {
        "samples": sample_metrics(classifier, samples, reference, only_digit),
        "decoded_train_latents": sample_metrics(classifier, decode_latents(autoencoder, train_z, stats),
                                                       reference, only_digit),
        "real_train_images": sample_metrics(classifier, train_images[pick], reference, only_digit),
        "count": n, "test_reference_count": len(reference)}
    metrics["samples"].update({"sampler": sampler, "steps": steps, "sampling_s": sampling_s})
    fd = {name: metrics[name]["fd"] for name in ("samples", "decoded_train_latents", "real_train_images")}
    metrics["fd_ratio_samples_to_decoded_train"] = fd_ratio(fd["samples"], fd["decoded_train_latents"])
    metrics["fd_ratio_samples_to_real"] = fd_ratio(fd["samples"], fd["real_train_images"])
    ceiling = fd_ratio(fd["decoded_train_latents"], fd["real_train_images"])
    problems = []
    if ae_reconstruction_mse is not None and ae_reconstruction_mse > AE_MAX_RECONSTRUCTION_MSE:
        problems.append(f"test reconstruction MSE {ae_reconstruction_mse:.4f} > {AE_MAX_RECONSTRUCTION_MSE}")
    if ceiling is None:
        problems.append("its FD ratio to real data could not be computed")
    elif ceiling > AE_CEILING_MAX_FACTOR:
        problems.append(f"decoded training latents score {ceiling:.1f}x the real-vs-real FD (> {AE_CEILING_MAX_FACTOR:g}x)")
    metrics["ae_ceiling"] = {"fd_ratio_decoded_train_to_real": ceiling, "test_reconstruction_mse": ae_reconstruction_mse,
                             "near_real_data": not problems, "problems": problems}

    show = lambda value, spec: "unavailable" if value is None else format(value, spec)
    for name in ("samples", "decoded_train_latents", "real_train_images"):
        line = f"{name:>21}: classifier FD {show(fd[name], '.3f')}"
        if fd[name] is None:
            line += f" ({metrics[name]['fd_unavailable']})"
        if only_digit is not None:
            line += f", classified as {only_digit}: {metrics[name]['digit_accuracy']:.1%}"
        print(line)
    print(f"FD(samples) / FD(decoded training latents) = {show(metrics['fd_ratio_samples_to_decoded_train'], '.2f')}, "
          f"/ FD(real training images) = {show(metrics['fd_ratio_samples_to_real'], '.2f')} (N = {n} each, against "
          f"{len(reference)} test images; {sampler}, {steps} steps, {sampling_s:.0f} s)")
    if problems:
        print(f"warning: the autoencoder's ceiling is far from real data ({'; '.join(problems)}): these FDs measure the "
              "autoencoder, not the latent model, and no ratio here is a good result")
    return metrics


# ----------------------------------------------------------------------------------------------
# generation

def check_output_path(path):
    """Before any sampling: the extension names an image format Pillow can write, and the file can be created."""
    from PIL import Image
    extension = os.path.splitext(path)[1].lower()
    formats = Image.registered_extensions()  # {'.png': 'PNG', ...}
    if formats.get(extension) not in Image.SAVE:
        raise UserError(f"--output {path}: {extension or 'no extension'} is not an image format this can write "
                        f"(use .png, .jpg, .webp, ...)")
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UserError(f"--output {path}: cannot write into {directory} ({error.strerror or error})")


def generate(argv):
    parser = common.ArgumentParser(prog="latent_diffusion.py generate",
                                     description="Sample images from a trained latent diffusion checkpoint.")
    parser.add_argument("--ckpt", required=True, help="latent_diffusion checkpoint (checkpoints/last.pt or best.pt)")
    parser.add_argument("--ae-ckpt", default=None, help="autoencoder checkpoint (default: the path stored in --ckpt)")
    parser.add_argument("--num-images", type=common.positive_int, default=64, help="how many images")
    parser.add_argument("--output", default="generated.png", help="image grid to write (.png, or another format Pillow writes)")
    parser.add_argument("--nrow", type=common.positive_int, default=None, help="images per row (default: ~sqrt)")
    parser.add_argument("--sampler", choices=sorted(common.SAMPLERS), default="dpmpp", help="sampler from common.py")
    parser.add_argument("--steps", type=common.positive_int, default=20, help="sampler steps (network evaluations)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    check_output_path(args.output)
    device = common.pick_device(args.device)
    model, process, stats, meta = load_denoiser(args.ckpt, device)
    if args.steps > process.T:
        raise UserError(f"--steps must be <= T = {process.T} of this checkpoint, got {args.steps}")
    ae_path = args.ae_ckpt or meta["ae_ckpt"]
    if args.ae_ckpt is None and not os.path.isfile(ae_path):
        raise UserError(f"the autoencoder this model was trained on ({ae_path}) is gone; pass --ae-ckpt")
    autoencoder, ae_meta = autoencoders.load_autoencoder(ae_path, device)
    if ae_meta["args"]["latent_dim"] != meta["args"]["latent_dim"]:
        raise UserError(f"{ae_path} has a {ae_meta['args']['latent_dim']}-D latent, the model expects "
                        f"{meta['args']['latent_dim']}-D")
    z = sample_latents(model, process, stats, args.num_images, args.sampler, args.steps, seed=args.seed, device=device,
                       progress=True)
    images = decode_latents(autoencoder, z, stats)
    nrow = args.nrow or max(1, round(args.num_images ** 0.5))
    try:
        path = common.save_image_grid(args.output, images, nrow=nrow)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"--output {args.output}: cannot write it ({error})")
    print(f"wrote {args.num_images} images ({args.sampler}, {args.steps} steps) to {path}")
    return path


if __name__ == "__main__":
    common.run_main(main)
