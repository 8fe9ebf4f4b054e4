"""MLP and convolutional autoencoders for MNIST with a 16-D latent (SPEC section 2).

The latent space they learn is where latent_diffusion.py runs its diffusion model.

    python autoencoders.py --model conv --outdir runs/ae-conv              # train, writes runs/ae-conv/ae-conv.pt
    python autoencoders.py --model mlp --outdir runs/ae-mlp --tsne         # + t-SNE plot of test latents
    python autoencoders.py --model conv --outdir runs/ae-conv --resume     # continue after a kill / preemption
    python autoencoders.py --model conv --outdir runs/ae-conv --overwrite  # replace the model in runs/ae-conv
    python autoencoders.py --model conv --dataset mnist5k --epochs 2       # offline 5k subset, quick look

Outputs in --outdir: config.json, metrics.jsonl, ae-<model>.pt (everything needed to resume; its metadata
records the kind, the constructor args and whether training finished), reconstructions.png (rows of test digits, each above its
reconstruction), tsne.png (with --tsne), results.json (test reconstruction MSE, pixels in [0, 1]).
An outdir that already holds a model is never replaced silently: --resume continues it, --overwrite starts over.
"""
import argparse
import glob
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

SCRIPT = "autoencoders"
KINDS = ("mlp", "conv")
# settings that must match for --resume to continue a run
RUN_IDENTITY = ("model", "latent_dim", "channels", "epochs", "batch_size", "lr", "loss", "seed",
                "dataset_used")


# ----------------------------------------------------------------------------------------------
# models: encode (B, 1, 28, 28) in [0, 1] -> (B, latent_dim); decode back to pixels in [0, 1].
# The decoders end in logits; decode() applies the sigmoid, training uses the logits (BCE never saturates).

class Autoencoder(nn.Module):
    """encoder: (B, 1, 28, 28) -> (B, latent_dim); decoder: (B, latent_dim) -> (B, 1, 28, 28) logits."""

    def encode(self, x):
        return self.encoder(x)

    def decode_logits(self, z):
        return self.decoder(z)

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))

    def forward(self, x):
        return self.decode(self.encode(x))


class MLPAutoencoder(Autoencoder):
    """784 -> 512 -> 256 -> 128 -> latent_dim, and the mirror decoder."""

    def __init__(self, latent_dim=16, hidden_dims=(512, 256, 128)):
        super().__init__()
        widths = [28 * 28, *hidden_dims]
        encoder = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            encoder += [nn.Linear(width_in, width_out), nn.SiLU()]
        self.encoder = nn.Sequential(*encoder, nn.Linear(widths[-1], latent_dim))
        decoder = [nn.Linear(latent_dim, widths[-1])]
        for width_in, width_out in zip(widths[:0:-1], widths[-2::-1]):
            decoder += [nn.SiLU(), nn.Linear(width_in, width_out)]
        self.decoder = nn.Sequential(*decoder, nn.Unflatten(1, (1, 28, 28)))


class UpsampleConv(nn.Module):
    """Nearest-neighbour resize to `size`, then a 3x3 conv: the checkerboard-free alternative to a
    transposed convolution (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts")."""

    def __init__(self, in_channels, out_channels, size):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):  # (B, C_in, h, w) -> (B, C_out, size, size)
        return self.conv(F.interpolate(x, size=(self.size, self.size), mode="nearest"))


class ConvAutoencoder(Autoencoder):
    """Encoder: stride-2 3x3 convs 28 -> 14 -> 7 -> 4, then FC -> latent_dim.
    Decoder: FC -> (C3, 4, 4) -> 7 -> 14 -> 28 by explicit interpolation + conv, then a 3x3 conv to 1 channel."""

    def __init__(self, latent_dim=16, channels=(16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.SiLU(),   # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # (B, c2, 7, 7)
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.SiLU(),  # (B, c3, 4, 4)
            nn.Flatten(), nn.Linear(c3 * 4 * 4, latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c3 * 4 * 4), nn.Unflatten(1, (c3, 4, 4)), nn.SiLU(),
            UpsampleConv(c3, c2, 7), nn.SiLU(),                     # (B, c2, 7, 7)
            UpsampleConv(c2, c1, 14), nn.SiLU(),                    # (B, c1, 14, 14)
            UpsampleConv(c1, c1, 28), nn.SiLU(),                    # (B, c1, 28, 28)
            nn.Conv2d(c1, 1, 3, padding=1))                         # (B, 1, 28, 28) logits


def build_autoencoder(kind, **constructor_args):
    if kind == "mlp":
        return MLPAutoencoder(**constructor_args)
    if kind == "conv":
        return ConvAutoencoder(**constructor_args)
    raise UserError(f"unknown autoencoder kind {kind!r} ({', '.join(KINDS)})")


def load_autoencoder(path, device="cpu"):
    """Rebuild an autoencoder from its checkpoint alone: the class and constructor args come from the
    metadata (kind 'mlp' | 'conv', args). Returns (model in eval mode, meta). Bad files raise UserError."""
    state = common.load_checkpoint(path, script=SCRIPT, kinds=set(KINDS))
    meta = state["meta"]
    model = build_autoencoder(meta["kind"], **meta["args"])
    common.load_model_state(model, state["model"], path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), meta


def find_autoencoder_checkpoint(directory):
    """The AE checkpoint to use from a directory tree: conv before mlp, the newest (mtime) within a kind.

    Every *.pt below `directory` is opened and kept if its metadata says autoencoders.py wrote it."""
    if not os.path.isdir(directory):
        raise UserError(f"--ae-ckpt-dir {directory} is not a directory")
    found = {kind: [] for kind in KINDS}
    for path in glob.glob(os.path.join(directory, "**", "*.pt"), recursive=True):
        try:
            state = common.load_checkpoint(path, script=SCRIPT, kinds=set(KINDS))
        except UserError:
            continue
        found[state["meta"]["kind"]].append(path)
    for kind in KINDS[::-1]:  # conv first
        if found[kind]:
            return max(found[kind], key=os.path.getmtime)
    raise UserError(f"no autoencoder checkpoint (written by autoencoders.py) under {directory}")


@torch.no_grad()
def reconstruction_mse(model, images, batch_size=1000):
    """Mean squared error per pixel (pixels in [0, 1]) of decode(encode(x)) over images (N, 1, 28, 28)."""
    model.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        total += F.mse_loss(model(batch).float(), batch, reduction="sum").item()
    return total / images.numel()


@torch.no_grad()
def encode_all(model, images, batch_size=1000):
    """Latents (N, latent_dim) of images (N, 1, 28, 28), in eval mode."""
    model.eval()
    return torch.cat([model.encode(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


def save_tsne(path, latents, labels, seed):
    """t-SNE (van der Maaten & Hinton 2008) of latents (N, D), one colour per digit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    points = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(latents.cpu().numpy())
    figure, axis = plt.subplots(figsize=(6, 6))
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=3, vmin=-0.5, vmax=9.5)
    figure.colorbar(scatter, ticks=range(10), label="digit")
    axis.set_title(f"t-SNE of {len(points)} test latents")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data").add_argument
    data("--dataset", choices=common.DATASETS, default="auto",
         help="mnist (full, fetched once), mnist5k (offline subset), auto (full if possible)")
    data("--data-dir", default="./data", help="where MNIST lives / is fetched to")
    model = parser.add_argument_group("model").add_argument
    model("--model", choices=KINDS, default="conv", help="autoencoder kind")
    model("--latent-dim", type=common.positive_int, default=16, help="latent dimension")
    model("--channels", default="16,32,64", help="conv AE channels at 14, 7, 4 (comma separated)")
    model("--loss", choices=("bce", "mse"), default="bce",
          help="training loss on pixels: binary cross-entropy on the decoder logits, or MSE")
    training = parser.add_argument_group("training").add_argument
    training("--epochs", type=common.positive_int, default=None,
             help="training epochs (default: 10 on full MNIST, 100 on mnist5k: ~4700 / ~3500 steps)")
    training("--batch-size", type=common.positive_int, default=128, help="batch size")
    training("--lr", type=common.positive_float, default=2e-3, help="peak Adam learning rate (cosine decay to 0)")
    training("--seed", type=int, default=42, help="random seed (same seed on CPU -> same numbers)")
    evaluation = parser.add_argument_group("evaluation").add_argument
    evaluation("--tsne", action="store_true", help="write tsne.png of test latents coloured by digit")
    evaluation("--tsne-points", type=common.positive_int, default=2000, help="test latents in the t-SNE plot")
    system = parser.add_argument_group("system").add_argument
    system("--outdir", default=None, help="run directory (default: runs/ae-<model>)")
    system("--resume", action="store_true", help="continue from <outdir>/ae-<model>.pt if it exists")
    system("--overwrite", action="store_true",
           help="start over even if <outdir> already holds a model (it is replaced)")
    common.add_training_system_flags(system, compiled="model")
    args = parser.parse_args(argv)
    args.outdir = args.outdir or os.path.join("runs", f"ae-{args.model}")
    try:
        args.channels = [common.positive_int(c) for c in args.channels.split(",")]
    except ValueError:
        parser.error(f"--channels must be three positive integers like 32,64,128, got {args.channels!r}")
    if len(args.channels) != 3:
        parser.error(f"--channels needs three values, got {args.channels}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; pick one")
    return args


def checkpoint_status(meta):
    """One phrase about an AE checkpoint's progress from its metadata, e.g. 'finished, 10 epochs' or
    'unfinished: stopped after 3 of 10 epochs, at step 1400'; None for files written before this was recorded."""
    if "finished" not in meta:
        return None
    if meta["finished"]:
        return f"finished, {meta['epochs']} epochs"
    return f"unfinished: stopped after {meta['epoch']} of {meta['epochs']} epochs, at step {meta['step']}"


def claim_outdir(args, checkpoint_path):
    """Never replace a model silently: an outdir that holds one needs --resume (continue it) or --overwrite
    (its checkpoint, results and plots are deleted first)."""
    existing = common.load_checkpoint(checkpoint_path, script=SCRIPT, kinds={args.model})["meta"] \
        if os.path.exists(checkpoint_path) and not args.overwrite else None
    if existing and not args.resume:
        raise UserError(f"{checkpoint_path} already holds a model ({checkpoint_status(existing) or 'status unknown'}); "
                        "pass --resume to continue it, --overwrite to replace it, or pick another --outdir")
    if args.resume and not existing:
        print(f"--resume: no {checkpoint_path} yet, so nothing to resume; training from scratch")
    if args.overwrite and os.path.exists(checkpoint_path):
        print(f"--overwrite: replacing {checkpoint_path}")
        for name in ("results.json", "metrics.jsonl", "reconstructions.png", "tsne.png", os.path.basename(checkpoint_path)):
            if os.path.exists(os.path.join(args.outdir, name)):
                os.remove(os.path.join(args.outdir, name))


def reconstruction_loss(logits, images, kind):
    """bce: binary cross-entropy of the decoder's logits against pixels in [0, 1]; mse: MSE of their sigmoid."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, images)
    return F.mse_loss(torch.sigmoid(logits), images)


def save_reconstructions(path, model, test_x, test_y):
    """Rows 1 and 3: two test images of each digit 0..9; rows 2 and 4: their reconstructions."""
    with torch.no_grad():
        shown = torch.cat([torch.nonzero(test_y == d)[:2, 0] for d in range(10)])  # (20,), two of each digit
        originals = test_x[shown[0::2]], test_x[shown[1::2]]  # (10, 1, 28, 28) each, digits 0..9
        grid = torch.cat([originals[0], model(originals[0]), originals[1], model(originals[1])])
    return common.save_image_grid(path, grid.float(), nrow=10, scale=3)


def resume_from(checkpoint_path, config, model, optimizer, scheduler):
    """Restore a run from its checkpoint (model, optimiser, schedule, RNG in place); returns its progress
    (epoch, batch_index, step, elapsed). A run with other settings is refused."""
    state = common.load_checkpoint(checkpoint_path, script=SCRIPT, kinds={config["model"]})
    changed = [key for key in RUN_IDENTITY if state["config"].get(key) != config[key]]
    if changed:
        raise UserError(f"--resume: {checkpoint_path} was trained with other {', '.join(changed)}; "
                        f"use those settings or another --outdir")
    common.load_model_state(model, state["model"], checkpoint_path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    common.set_rng_state(state["rng"])
    return {key: state[key] for key in ("epoch", "batch_index", "step", "elapsed")}


def train_epoch(reconstruction_logits, model, optimizer, scheduler, train_x, progress, args, device, logger, stop,
                checkpoint_path):
    """The rest of epoch progress['epoch'] from batch progress['batch_index']; the order depends only on (seed,
    epoch), so a resumed run sees the same batches. progress['step'] and ['batch_index'] advance, and at the
    epoch's end ['epoch'] does (['batch_index'] reset). Returns True when a stop signal came (after its step)."""
    model.train()
    epoch, steps_per_epoch = progress["epoch"], (len(train_x) + args.batch_size - 1) // args.batch_size
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(device)
    bar = tqdm(range(progress["batch_index"], steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=args.no_progress, mininterval=1.0, leave=False)
    for batch_index in bar:
        batch = train_x[order[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]]
        with common.autocast(device, args.amp):
            logits = reconstruction_logits(batch).float()
        loss = reconstruction_loss(logits, batch, args.loss)
        loss_value = common.finite_loss(loss, f"step {progress['step']}", checkpoint_path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step = progress["step"] = progress["step"] + 1
        progress["batch_index"] = batch_index + 1
        bar.set_postfix(loss=f"{loss_value:.5f}", refresh=False)
        if step % args.log_every == 0:
            logger.log({"train/loss": loss_value, "train/learning_rate": scheduler.get_last_lr()[0],
                        "progress/epoch": epoch + (batch_index + 1) / steps_per_epoch}, step=step)
        if stop.received:
            return True
    progress["epoch"], progress["batch_index"] = epoch + 1, 0
    return False


def build_model(args, train_size, device):
    """(the autoencoder's constructor args, the autoencoder, Adam, its cosine schedule over all steps, the
    reconstruction logits function training calls: compiled with --compile)."""
    constructor_args = {"latent_dim": args.latent_dim}
    if args.model == "conv":
        constructor_args["channels"] = list(args.channels)
    model = build_autoencoder(args.model, **constructor_args).to(device)
    print(f"{args.model} autoencoder: {common.count_parameters(model):,} parameters, latent dim {args.latent_dim}")
    steps_per_epoch = (train_size + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    reconstruction_logits = lambda x: model.decode_logits(model.encode(x))  # (B, 1, 28, 28) -> logits, same shape
    if args.compile:
        reconstruction_logits = torch.compile(reconstruction_logits)
    return constructor_args, model, optimizer, scheduler, reconstruction_logits


def open_run(args, config, checkpoint_path, model, optimizer, scheduler):
    """(progress, the RunLogger): a new run's progress, or with --resume the checkpoint's restored into model,
    optimiser and schedule; config.json written, the logs cut back to the checkpoint."""
    progress = {"epoch": 0, "batch_index": 0, "step": 0, "elapsed": 0.0}   # saved with every checkpoint
    if args.resume and os.path.exists(checkpoint_path):
        progress = resume_from(checkpoint_path, config, model, optimizer, scheduler)
        print(f"resumed from {checkpoint_path} at epoch {progress['epoch']}, step {progress['step']}")
    common.write_json(os.path.join(args.outdir, "config.json"), config)
    logger = common.RunLogger(args.outdir, config, args.wandb, name=os.path.basename(os.path.normpath(args.outdir)),
                              resume=bool(progress["step"]))
    if progress["step"]:
        logger.truncate_after(progress["step"])  # resumed: the steps after the checkpoint are logged again by this run
    return progress, logger


def evaluate_epoch(model, test_x, progress, args, logger):
    """The test reconstruction MSE after epoch progress['epoch'], logged and printed; returns it."""
    test_mse = reconstruction_mse(model, test_x)
    logger.log({"test/reconstruction_mse": test_mse, "progress/epoch": progress["epoch"],
                "time/elapsed_s": progress["elapsed"]}, step=progress["step"])
    print(f"epoch {progress['epoch']}/{args.epochs}: test reconstruction MSE {test_mse:.5f} ({progress['elapsed']:.0f} s)")
    return test_mse


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    common.prepare_outdir(args.outdir)
    checkpoint_path = os.path.join(args.outdir, f"ae-{args.model}.pt")
    claim_outdir(args, checkpoint_path)

    # data: whole dataset as tensors on the device, batches are slices
    data = common.load_mnist(args.dataset, args.data_dir, device)
    train_x, test_x = data["x"], data["x_test"]  # (N, 1, 28, 28) in [0, 1]
    args.epochs = args.epochs or (10 if data["name"] == "mnist" else 100)

    # model, optimiser, schedule
    constructor_args, model, optimizer, scheduler, reconstruction_logits = build_model(args, len(train_x), device)

    config = {**vars(args), "dataset_used": data["name"], "train_size": data["train_size"],
              "test_size": data["test_size"], "parameters": common.count_parameters(model)}
    meta = common.checkpoint_meta(SCRIPT, args.model, args=constructor_args, dataset=data["name"])
    progress, logger = open_run(args, config, checkpoint_path, model, optimizer, scheduler)

    def save(test_mse=None, finished=False):
        common.save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            **progress, "rng": common.rng_state(), "config": config,
            "meta": {**meta, "test_mse": test_mse, "finished": finished, "epoch": progress["epoch"],
                     "epochs": args.epochs, "step": progress["step"]}})

    # training loop: BCE (or MSE) on pixels, Adam with cosine decay
    stop = common.StopSignal()
    started = time.time() - progress["elapsed"]
    try:
        while progress["epoch"] < args.epochs:
            stopped = train_epoch(reconstruction_logits, model, optimizer, scheduler, train_x, progress, args, device,
                                  logger, stop, checkpoint_path)
            progress["elapsed"] = time.time() - started
            if stopped:
                save()
                print(f"{stop.received} received: saved {checkpoint_path} at step {progress['step']}; rerun with --resume")
                logger.finish()  # the W&B run is continued by the resumed run (same id)
                return
            save(evaluate_epoch(model, test_x, progress, args, logger))
    finally:
        stop.close()
    epoch, step, elapsed = progress["epoch"], progress["step"], progress["elapsed"]

    # evaluation
    test_mse = reconstruction_mse(model, test_x)
    train_mse = reconstruction_mse(model, train_x[:10000])
    print(f"test reconstruction MSE {test_mse:.5f} (train {train_mse:.5f}), pixels in [0, 1]")
    save(test_mse, finished=True)
    recon_path = save_reconstructions(os.path.join(args.outdir, "reconstructions.png"), model, test_x, data["y_test"])
    logger.log_image("reconstructions", recon_path, caption="rows 1, 3: test digits; rows 2, 4: reconstructions",
                     step=step)
    results = {"model": args.model, "dataset": data["name"], "test_reconstruction_mse": test_mse,
               "train_reconstruction_mse_first10k": train_mse, "epochs": epoch, "steps": step,
               "train_time_s": elapsed, "parameters": config["parameters"], "checkpoint": checkpoint_path}
    if args.tsne:
        count = min(args.tsne_points, len(test_x))
        save_tsne(os.path.join(args.outdir, "tsne.png"), encode_all(model, test_x[:count]), data["y_test"][:count], args.seed)
        logger.log_image("tsne", os.path.join(args.outdir, "tsne.png"), step=step)
        results["tsne"] = os.path.join(args.outdir, "tsne.png")
    common.write_json(os.path.join(args.outdir, "results.json"), results)
    logger.log({"final/test_reconstruction_mse": test_mse}, step=step)
    logger.finish(results)
    print(f"wrote {checkpoint_path}, {recon_path} and results.json")


if __name__ == "__main__":
    common.run_main(main)
