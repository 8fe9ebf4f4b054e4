"""Tests of no_diffusion.py: noise covariance, spectral convolution, circular statistics, metrics, a brief
training on a known Gaussian random field, eval modes, one-line errors, resume. CPU only, offline, tiny."""
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import helpers
from helpers import one_thread  # noqa: F401 (an autouse fixture)
import no_diffusion


run_cli = functools.partial(helpers.run_cli, no_diffusion.main)


def tiny_args(outdir, data_dir, *extra):
    return ["--outdir", str(outdir), "--data-dir", str(data_dir), "--dataset", "grf", "--resolution", "16",
            "--n-functions", "320", "--width", "8", "--modes", "4", "--layers", "2", "--batch-size", "32",
            "--L", "20", "--Ntest", "32", "--steps", "4", "--record-interval", "1", "--epochs", "2",
            "--no-progress", *extra]


# ----------------------------------------------------------------------------------------------
# noise

@pytest.mark.parametrize("kernel,scale", [("se", 0.1), ("exponential", 0.2)])
def test_fft_noise_covariance_matches_the_kernel(kernel, scale):
    noise = no_diffusion.GaussianNoise(12, "rbf", kernel, scale, nugget=0.1)
    samples = noise.draw(20000, torch.Generator().manual_seed(0))
    assert samples.shape == (20000, 2, 12, 12)
    for channel in (0, 1):
        flat = samples[:, channel].reshape(len(samples), -1).double()
        empirical = flat.T @ flat / len(flat)                     # (144, 144), mean 0 by construction
        truth = noise.covariance(144)
        # the standard error of one entry is at most sqrt(2 / 20000) = 0.01
        assert (empirical - truth).abs().max() < 0.06
        assert abs(empirical.diagonal().mean() - (1 + 0.1**2)) < 0.02
    # the two channels are independent
    assert abs(torch.corrcoef(torch.stack([samples[:, 0].flatten(), samples[:, 1].flatten()]))[0, 1]) < 0.01
    # a pair of pixels a known distance apart: the kernel value itself
    d = 3 / 12
    expected = math.exp(-d**2 / (2 * scale**2)) if kernel == "se" else math.exp(-d / (2 * scale**2))
    assert abs(float((samples[:, 0, 0, 0] * samples[:, 0, 0, 3]).mean()) - expected) < 0.03


def test_white_noise_and_embedding_size():
    white = no_diffusion.GaussianNoise(8, "white").draw(5000, torch.Generator().manual_seed(0))
    assert abs(white.var() - 1) < 0.02
    assert torch.equal(no_diffusion.GaussianNoise(8, "white").covariance(10), torch.eye(10, dtype=torch.float64))
    # a short kernel needs a torus barely larger than the grid; a long one a larger torus, which keeps it PSD
    assert no_diffusion.GaussianNoise(128, "rbf", "exponential", 0.05).m < 150
    long = no_diffusion.GaussianNoise(32, "rbf", "se", 0.5)
    assert long.m >= 64 and long.clipped_share < 1e-6


# ----------------------------------------------------------------------------------------------
# model

def smooth_function(n):
    """A band-limited periodic function on the n x n grid of [0,1)^2, 3 channels, (1, 3, n, n)."""
    y, x = torch.meshgrid(torch.arange(n) / n, torch.arange(n) / n, indexing="ij")
    channels = [torch.sin(2 * math.pi * x) + 0.5 * torch.cos(2 * math.pi * 3 * y),
                torch.cos(2 * math.pi * (x + 2 * y)), torch.sin(2 * math.pi * 2 * x) * torch.cos(2 * math.pi * y)]
    return torch.stack(channels)[None].float()


def test_spectral_convolution_is_consistent_across_resolutions():
    torch.manual_seed(0)
    layer = no_diffusion.SpectralConv2d(3, 4, modes=5)
    coarse, fine = layer(smooth_function(16)), layer(smooth_function(32))
    assert coarse.shape == (1, 4, 16, 16) and fine.shape == (1, 4, 32, 32)
    assert coarse.abs().max() > 0.1
    assert torch.allclose(fine[..., ::2, ::2], coarse, atol=1e-5)


def test_spectral_convolution_is_the_fourier_layer_written_out():
    """K h = IFFT(R . FFT(h)) with R applied to the kept frequencies by a complex product (Li et al. 2021, Eq. 4),
    computed here the direct way (complex einsum into a zeroed spectrum), on odd and even grids, values and gradients."""
    torch.manual_seed(0)
    layer = no_diffusion.SpectralConv2d(3, 4, modes=5)
    for height, width in ((16, 16), (12, 9), (10, 10)):
        x = torch.randn(2, 3, height, width, requires_grad=True)
        spectrum = torch.fft.rfft2(x, norm="forward")
        rows, cols = min(5, height // 2), min(5, width // 2 + 1)
        weight = torch.view_as_complex(layer.weight)
        out = torch.zeros(2, 4, height, width // 2 + 1, dtype=torch.complex64)
        out[:, :, :rows, :cols] = torch.einsum("bixy,ioxy->boxy", spectrum[:, :, :rows, :cols], weight[0, :, :, :rows, :cols])
        out[:, :, -rows:, :cols] = torch.einsum("bixy,ioxy->boxy", spectrum[:, :, -rows:, :cols], weight[1, :, :, :rows, :cols])
        direct = torch.fft.irfft2(out, s=(height, width), norm="forward")
        ours = layer(x)
        assert direct.abs().max() > 0.01 and torch.allclose(ours, direct, atol=1e-6)
        probe = torch.randn_like(direct)
        gradients = torch.autograd.grad((ours * probe).sum(), [x, layer.weight])
        expected = torch.autograd.grad((direct * probe).sum(), [x, layer.weight])
        for got, want in zip(gradients, expected):
            assert torch.allclose(got, want, atol=1e-5)


def test_model_runs_at_any_resolution_and_depends_on_sigma():
    torch.manual_seed(0)
    model = no_diffusion.ScoreFNO(width=8, modes=4, layers=2)
    for block in model.blocks:   # FiLM starts at zero; give it weights so sigma matters
        torch.nn.init.normal_(block.film.proj.weight, std=0.1)
    x = torch.randn(2, 2, 16, 16)
    assert model(x, torch.tensor([1.0, 1.0])).shape == (2, 2, 16, 16)
    assert model(torch.randn(2, 2, 24, 24), torch.tensor([1.0, 1.0])).shape == (2, 2, 24, 24)
    assert not torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([10.0, 10.0])))
    ablation = no_diffusion.ScoreFNO(width=8, modes=4, layers=2, sigma_embedding=False)
    assert torch.equal(ablation(x, torch.tensor([0.1, 0.1])), ablation(x, torch.tensor([10.0, 10.0])))


def test_geometric_sigmas():
    sigmas = no_diffusion.geometric_sigmas(30.0, 0.01, 500)
    assert sigmas.shape == (500,) and math.isclose(sigmas[0], 30) and math.isclose(sigmas[-1], 0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


# ----------------------------------------------------------------------------------------------
# metrics

def functions_with_phases(phases):
    phase = torch.tensor(phases, dtype=torch.float64).view(1, 2, 2)
    return torch.stack([torch.cos(phase), torch.sin(phase)], dim=1)


def test_circular_statistics_match_hand_computed_values():
    # phases 0, 0, pi/2, pi: C1 = 1, S1 = 1, R1 = sqrt(2)/4, T1 = pi/4; 2 phi = 0, 0, pi, 2 pi: C2 = 2, S2 = 0,
    # R2 = 1/2, T2 = 0; skewness = R2 sin(T2 - 2 T1) / (1 - R1)^{3/2} = -1/2 / (1 - sqrt(2)/4)^{3/2}
    variance, skewness = no_diffusion.circular_statistics(functions_with_phases([0, 0, math.pi / 2, math.pi]))
    assert variance[0] == pytest.approx(1 - math.sqrt(2) / 4, abs=1e-12)
    assert skewness[0] == pytest.approx(-0.5 / (1 - math.sqrt(2) / 4) ** 1.5, abs=1e-12)
    # a constant phase: variance 0; a uniform spread over the circle: variance 1
    variance, _ = no_diffusion.circular_statistics(functions_with_phases([1.0, 1.0, 1.0, 1.0]))
    assert variance[0] == pytest.approx(0, abs=1e-12)
    variance, _ = no_diffusion.circular_statistics(functions_with_phases([0, math.pi / 2, math.pi, -math.pi / 2]))
    assert variance[0] == pytest.approx(1, abs=1e-12)


def test_metrics_of_identical_sets_are_zero_and_of_different_sets_positive():
    functions = no_diffusion.grf_functions(64, seed=0, resolution=8)
    metrics = no_diffusion.function_metrics(functions, functions, source_cnn=no_diffusion.SourceCNN().eval())
    keys = no_diffusion.METRICS + no_diffusion.STRUCTURE
    assert set(keys) <= set(metrics)
    assert all(metrics[key] == pytest.approx(0, abs=1e-6) for key in keys), metrics   # FD: eigenvalue round-off
    shifted = no_diffusion.function_metrics(functions + 0.5, functions)
    assert shifted["mean_l2"] == pytest.approx(0.5, abs=1e-6) and shifted["w_total"] > 0


def plane_wave(n, cycles, count=1):
    """phi = 2 pi * cycles * x on the n x n grid of [0,1)^2 (wrapped), as (count, 2, n, n) functions."""
    x = (torch.arange(n, dtype=torch.float64) / n).expand(n, n)
    phase = 2 * math.pi * cycles * x
    return torch.stack([torch.cos(phase), torch.sin(phase)])[None].expand(count, -1, -1, -1)


@pytest.mark.parametrize("n", [32, 64])
def test_structure_statistics_of_a_plane_wave(n):
    """exp(i phi) of a plane wave with k cycles along x is one Fourier mode: all the power in radial bin k;
    its phase gradient is 2 pi k per unit length everywhere; its autocorrelation at a lag of l px is
    cos(2 pi k l / n) along x and 1 along y. The bins and the lags mean the same at 32 and 64 px."""
    k = 5
    waves = plane_wave(n, k)
    spectrum = no_diffusion.radial_power_spectrum(waves)[0]
    assert spectrum.shape == (n // 2,) and int(spectrum.argmax()) == k
    assert spectrum[k] > 0 and spectrum.sum() - spectrum[k] < 1e-20
    frequency = torch.fft.fftfreq(n, d=1 / n)
    modes_in_bin = int((torch.sqrt(frequency[:, None] ** 2 + frequency[None, :] ** 2).round() == k).sum())
    assert float(spectrum[k]) * modes_in_bin == pytest.approx(1.0, abs=1e-9)      # Parseval: |exp(i phi)| = 1
    assert float(no_diffusion.phase_gradient(waves)[0]) == pytest.approx(2 * math.pi * k, rel=1e-9)
    autocorrelation = no_diffusion.spatial_autocorrelation(waves)[0]
    for value, lag in zip(autocorrelation.tolist(), no_diffusion.ACF_LAGS):
        pixels = max(1, round(lag * n / 64))                                    # at least one pixel
        assert value == pytest.approx((math.cos(2 * math.pi * k * pixels / n) + 1) / 2, abs=1e-9)


def vortices(n, centres):
    """exp(i phi) with phi = sum of +-atan2(y - y_c, x - x_c): one phase singularity of charge +-1 at each
    centre ((x_c, y_c, charge) in domain units, off the grid points), (1, 2, n, n)."""
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64) / n, torch.arange(n, dtype=torch.float64) / n, indexing="ij")
    phase = sum(charge * torch.atan2(y - y_c, x - x_c) for x_c, y_c, charge in centres)
    return torch.stack([torch.cos(phase), torch.sin(phase)])[None]


@pytest.mark.parametrize("n", [32, 64])
def test_phase_residues_count_the_singularities(n):
    """A plane wave (a continuous phase, even with many fringes) has no residue; a vortex has one, a
    vortex-antivortex pair two, at any grid size; the metric is W1 of the counts, so one extra vortex per
    function moves it by 1."""
    pair = [(0.31, 0.42, 1), (0.71, 0.58, -1)]
    counts = [float(no_diffusion.phase_residues(field)[0]) for field in
              (plane_wave(n, 5), plane_wave(n, 9), vortices(n, pair[:1]), vortices(n, pair))]
    assert counts == [0, 0, 1, 2]
    smooth, one = plane_wave(n, 3, count=4), vortices(n, pair[:1]).expand(4, -1, -1, -1)
    assert no_diffusion.function_metrics(one, smooth)["residues"] == pytest.approx(1.0)
    assert no_diffusion.function_metrics(smooth, smooth)["residues"] == 0


def test_shuffled_pixels_keep_the_circular_statistics_but_fail_the_structure_metrics(tmp_path):
    """A "sampler" of real functions with their pixels shuffled keeps every phase value, so the reference's
    w_var and w_skew cannot tell it from the real thing; the structure metrics must, far above their floor."""
    data = no_diffusion.load_functions("synthetic-volcano", 32, 0, 400, 0.2, str(tmp_path))
    reference = no_diffusion.statistics_of(data["train"])
    floor, spread, count = no_diffusion.real_floor(data, 80, reference)
    assert count == 80 and all(spread[key] > 0 for key in ("w_total", "spectrum", "acf_1", "gradient"))
    real = data["held_out"][:80]
    order = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))
    shuffled = real.flatten(2)[:, :, order].view_as(real)
    as_real, as_shuffled = (no_diffusion.function_metrics(x, None, reference) for x in (real, shuffled))
    assert as_shuffled["w_var"] == pytest.approx(as_real["w_var"], abs=1e-12)
    assert as_shuffled["w_skew"] == pytest.approx(as_real["w_skew"], abs=1e-9)
    assert as_shuffled["w_total"] < floor["w_total"] + 3 * spread["w_total"]
    for key in ("spectrum", "acf_1", "acf_4", "gradient", "residues"):
        assert as_shuffled[key] > 10 * floor[key], key
        assert as_real[key] < floor[key] + 3 * spread[key], key
    scoring = {"floor": floor, "spread": spread}
    assert no_diffusion.verdicts(as_shuffled, scoring)["acf_1"] == "not met"
    assert no_diffusion.score(shuffled, {**scoring, "cnn": None, "reference": reference})["worst_metric"] in \
        ("acf_1", "acf_4", "gradient", "spectrum", "residues")


def test_verdicts_are_decided_only_beyond_the_spread():
    assert no_diffusion.verdict(1.0, 1.0, 0.1, 2.0) == "met"            # 1.0 < 2.0 - 0.2
    assert no_diffusion.verdict(1.9, 1.0, 0.1, 2.0) == "within noise"   # |1.9 - 2.0| <= 0.2
    assert no_diffusion.verdict(2.5, 1.0, 0.1, 2.0) == "not met"
    ratio, key = no_diffusion.worst_ratio({"w_total": 3.0, "spectrum": 1.0, "mean_l2": 100.0},
                                          {"w_total": 1.0, "spectrum": 0.1, "mean_l2": 1.0})
    assert (ratio, key) == (10.0, "spectrum")                           # mean_l2 is not a headline metric


def test_source_cnn_recovers_the_sources_of_held_out_functions():
    """Trained briefly on 2,048 functions of one seed, the source-CNN finds the sources of functions of another
    seed, with a position error well below the source's size (depth 0.05-0.2, the fringes' radius)."""
    torch.manual_seed(0)
    cnn = no_diffusion.train_source_cnn(count=2048, epochs=3, seed=5)
    phase, sources = no_diffusion.synthetic_volcano_phase(400, seed=6, source_share=0.5, return_sources=True)
    features, found, parameters = no_diffusion.source_outputs(cnn, no_diffusion.phase_to_functions(phase, 64, 0))
    has_source = sources[:, 0] == 1
    assert features.shape == (400, 128)
    assert found[has_source].double().mean() > 0.9 and found[~has_source].double().mean() < 0.1
    position_error = (parameters[has_source, :2] - sources[has_source, 1:3]).norm(dim=1)
    assert position_error.median() < 0.04
    assert (parameters[has_source, 3].sign() == sources[has_source, 4].sign()).double().mean() > 0.9
    # at 128 px it sees the same functions resampled to 64 px
    fine = no_diffusion.phase_to_functions(phase[:8], 128, 0)
    assert torch.allclose(no_diffusion.to_source_grid(fine), no_diffusion.phase_to_functions(phase[:8], 64, 0), atol=0.05)


# ----------------------------------------------------------------------------------------------
# data

def test_synthetic_volcano_is_seeded_wrapped_and_split(tmp_path):
    phase = no_diffusion.synthetic_volcano_phase(6, seed=3, size=32)
    assert torch.equal(phase, no_diffusion.synthetic_volcano_phase(6, seed=3, size=32))
    assert phase.abs().max() <= math.pi + 1e-6 and phase.std() > 0.5
    data = no_diffusion.load_functions("synthetic-volcano", 16, 0, 40, 0.25, str(tmp_path))
    assert data["train"].shape == (30, 2, 16, 16) and data["held_out"].shape == (10, 2, 16, 16)
    norms = data["train"].pow(2).sum(1)        # cos^2 + sin^2, below 1 where resizing averaged fringes
    assert norms.max() <= 1.001 and norms.mean() > 0.7
    again = no_diffusion.load_functions("synthetic-volcano", 16, 0, 40, 0.25, str(tmp_path))    # from the cache
    assert "cached in" in again["reason"] and torch.equal(again["held_out"], data["held_out"])


def test_volcano_reader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "ints" / "sub"
    folder.mkdir(parents=True)
    raw = rng.standard_normal((3, 128, 128, 2)).astype(np.float32)
    for i in range(3):
        raw[i].tofile(folder / f"{i}.int")
    phases = no_diffusion.read_volcano(str(tmp_path / "ints"))
    assert torch.allclose(phases[1], torch.from_numpy(np.arctan2(raw[1, ..., 1], raw[1, ..., 0])))
    functions = no_diffusion.phase_to_functions(phases, 128, 8)
    assert functions.shape == (3, 2, 120, 120)


def test_the_floor_has_as_many_functions_as_samples(tmp_path, capsys):
    """Past the held-out split, a generated set draws fresh functions of the same law (not copies of the
    split, the same ones every time); real data cannot, and its floor says with how many it was measured."""
    data = no_diffusion.load_functions("synthetic-volcano", 16, 2, 40, 0.25, str(tmp_path))
    stats = no_diffusion.statistics_of(data["train"])
    floor, spread, count = no_diffusion.real_floor(data, 25, stats)
    assert count == 25 and no_diffusion.real_floor(data, 6, stats)[2] == 6
    fresh = data["more"](4 * 25 - 10)
    assert fresh.shape == (90, 2, 14, 14) and torch.equal(fresh, data["more"](90))
    for name in ("synthetic-volcano", "grf"):  # none is a copy of the set's functions, also when drawing more of them
        functions = no_diffusion.load_functions(name, 16, 0, 40, 0.25, str(tmp_path))
        everything = torch.cat([functions["train"], functions["held_out"]]).flatten(1)
        assert torch.cdist(functions["more"](60).flatten(1), everything).min() > 0.1
    assert (floor, spread) == no_diffusion.real_floor(data, 25, stats)[:2]
    pool = torch.cat([data["held_out"], fresh])                              # four disjoint sets of 25
    draws = [no_diffusion.function_metrics(pool[i * 25:(i + 1) * 25], None, stats) for i in range(4)]
    assert floor["w_total"] == pytest.approx(np.mean([draw["w_total"] for draw in draws]), abs=1e-12)
    assert spread["spectrum"] == pytest.approx(np.std([draw["spectrum"] for draw in draws], ddof=1), abs=1e-12)
    real = {key: data[key] for key in ("train", "held_out")}                 # volcano-like: no fresh functions
    assert no_diffusion.real_floor(real, 25, stats)[2] == 10
    assert "only 10 held-out functions for 25 samples" in capsys.readouterr().out


def one_line_error(capsys, argv):
    status = run_cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_inputs_give_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"batch_size": 16,')
    assert "not valid JSON" in one_line_error(capsys, ["--config", str(corrupt), "--outdir", str(tmp_path / "a")])
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"sigma_one": 3}')
    assert "unknown keys" in one_line_error(capsys, ["--config", str(unknown), "--outdir", str(tmp_path / "a")])
    missing = tmp_path / "nowhere"
    os.environ.pop("DATA_DIR", None)
    assert "does not exist" in one_line_error(capsys, ["--dataset", "volcano", "--data-dir", str(missing),
                                                       "--outdir", str(tmp_path / "b")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.int files" in one_line_error(capsys, ["--dataset", "volcano", "--data-dir", str(empty),
                                                       "--outdir", str(tmp_path / "b")])
    (empty / "short.int").write_bytes(b"\0" * 1000)
    assert "1000 bytes" in one_line_error(capsys, ["--dataset", "volcano", "--data-dir", str(empty),
                                                   "--outdir", str(tmp_path / "b")])
    assert "--sigma-1" in one_line_error(capsys, ["--sigma-1", "0.001", "--outdir", str(tmp_path / "c")])


def test_flags_override_the_experiment_file(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"noise": "white", "batch_size": 8, "sigma_1": 5.0}))
    args = no_diffusion.parse_args(["--config", str(config), "--batch-size", "4"])
    assert args.noise == "white" and args.batch_size == 4 and args.sigma_1 == 5.0
    os.environ["SAVEDIR"] = str(tmp_path / "saved")
    try:
        assert no_diffusion.run_directory(no_diffusion.parse_args(["--config", str(config), "--run-id", "7"])) == \
            str(tmp_path / "saved" / "7" / "exp")
    finally:
        del os.environ["SAVEDIR"]
    for name in ("indep", "rbf", "rbf-reference"):   # the shipped experiment files parse
        path = os.path.join(helpers.ROOT, "json", f"{name}.json")
        no_diffusion.parse_args(["--config", path])
    reference = no_diffusion.parse_args(["--config", os.path.join(helpers.ROOT, "json", "rbf-reference.json")])
    assert reference.max_minutes == 0 and reference.epochs == 100000 and reference.width == 16   # no time limit


def test_the_time_limit_ends_training_without_epochs(tmp_path, capsys):
    """The default trains for --max-minutes, not for a number of epochs: a tiny limit stops after the first step,
    mid-epoch, and still scores and writes results.json; no limit and no --epochs is one error line."""
    defaults = no_diffusion.parse_args([])
    assert defaults.epochs is None and defaults.max_minutes == 9.0
    argv = tiny_args(tmp_path / "run", tmp_path / "data", "--max-minutes", "1e-6")
    del argv[argv.index("--epochs"):argv.index("--epochs") + 2]
    assert run_cli(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 1 and results["epochs"] == 0 and math.isfinite(results["w_total"])
    assert "--max-minutes 0 (no time limit) needs --epochs" in one_line_error(
        capsys, ["--max-minutes", "0", "--outdir", str(tmp_path / "b")])


# ----------------------------------------------------------------------------------------------
# training, sampling, evaluation

def covariance_errors(samples, truth_variance=1.0, neighbour=math.exp(-(1 / 16) ** 2 / (2 * 0.1**2))):
    """|pointwise variance - truth| and |covariance of horizontal neighbours - truth|, averaged."""
    x = samples.double()
    variance = x.var(0).mean()
    pair = (x[..., :, :-1] * x[..., :, 1:]).mean(0).mean() - (x.mean(0)[..., :, :-1] * x.mean(0)[..., :, 1:]).mean()
    return abs(float(variance) - truth_variance), abs(float(pair) - neighbour)


@pytest.mark.parametrize("parametrisation", [("none", "levels"), ("edm", "lognormal")])
def test_brief_training_on_grf_moves_samples_to_the_true_covariance(tmp_path, parametrisation):
    """The reference's noise prediction over its levels, and the EDM default: samples move to the true covariance."""
    outdir = tmp_path / "grf"
    assert run_cli(tiny_args(outdir, tmp_path / "data", "--epochs", "12", "--record-interval", "12", "--lr", "3e-3",
                             "--ema-decay", "0.9", "--noise", "white", "--sigma-1", "5", "--steps", "10",
                             "--precondition", parametrisation[0], "--sigma-sampling", parametrisation[1])) == 0
    args, trained = no_diffusion.load_run(str(outdir), "model.pt", "cpu")
    noise = no_diffusion.GaussianNoise(16, "white")
    sigmas = no_diffusion.geometric_sigmas(args.sigma_1, args.sigma_L, args.L)
    options = {"steps": 10, "churn": 0.0}
    torch.manual_seed(0)
    untrained = no_diffusion.ScoreFNO(**no_diffusion.model_args_of(args, 16, 0.7))
    before, _, _ = no_diffusion.generate_functions(untrained, noise, sigmas, 256, "heun", options, 256, 5, "cpu")
    after, evaluations, _ = no_diffusion.generate_functions(trained, noise, sigmas, 256, "heun", options, 256, 5, "cpu")
    assert evaluations == 19
    variance_before, pair_before = covariance_errors(before)
    variance_after, pair_after = covariance_errors(after)
    assert variance_after < 0.35 and pair_after < 0.35
    if parametrisation[0] == "none":   # (an untrained EDM model already shrinks its input towards 0 by c_skip)
        assert variance_after < 0.3 * variance_before and pair_after < 0.3 * pair_before
    results = json.loads((outdir / "results.json").read_text())
    assert results["evaluations_per_sample"] == 19 and results["floor_count"] == 32
    headline = no_diffusion.METRICS + ("spectrum", "acf_1", "acf_4", "acf_16", "gradient", "residues")
    assert set(headline) <= set(results) and set(headline) <= set(results["floor"]) <= set(results["floor_spread"])
    assert results["worst_ratio"] == max(results[key] / results["floor"][key] for key in headline[2:3] + headline[5:])


def test_heun_levels_follow_sigma_max_and_rho():
    """Heun's Euler evaluations sit on Karras et al.'s Eq. 5 levels, from sigma_max down to sigma_L with exponent
    rho; by default from sigma_1 with rho = 7."""
    sigmas = no_diffusion.geometric_sigmas(30.0, 0.01, 10)
    ramp = torch.arange(5, dtype=torch.float64) / 4
    for options, top, rho in (({"sigma_max": 5.0, "rho": 3.0}, 5.0, 3.0), ({}, 30.0, 7.0)):
        seen = []
        predict_noise = lambda x, sigma: seen.append(sigma) or torch.zeros_like(x)
        no_diffusion.sample_heun(predict_noise, torch.zeros(1, 2, 4, 4), sigmas, None, steps=5, **options)
        expected = (top ** (1 / rho) + ramp * (0.01 ** (1 / rho) - top ** (1 / rho))) ** rho
        assert len(seen) == 9 and seen[1:-1:2] == seen[2::2]     # each correction at the next Euler level
        assert torch.allclose(torch.tensor(seen[0::2], dtype=torch.float64), expected, rtol=1e-12)


def test_langevin_sampler_counts_evaluations_and_stays_finite():
    model = no_diffusion.ScoreFNO(width=8, modes=4, layers=1)
    noise = no_diffusion.GaussianNoise(8, "rbf", "se", 0.1, 0.01)
    sigmas = no_diffusion.geometric_sigmas(1.0, 0.01, 5)
    samples, evaluations, _ = no_diffusion.generate_functions(model, noise, sigmas, 4, "langevin",
                                                              {"T": 3, "epsilon": 1e-3}, 4, 0, "cpu")
    assert evaluations == 15 and samples.shape == (4, 2, 8, 8) and torch.isfinite(samples).all()


def test_sampling_batch_size_defaults_by_device_and_grid():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert no_diffusion.sampling_batch_size(None, cpu, 64) == 32          # 32 functions of 64 x 64 on a CPU
    assert no_diffusion.sampling_batch_size(None, cpu, 128) == 8          # the same grid points at 2x resolution
    assert no_diffusion.sampling_batch_size(None, cpu, 4096) == 1
    assert no_diffusion.sampling_batch_size(None, cuda, 64) == 128
    assert no_diffusion.sampling_batch_size(5, cpu, 64) == 5              # --val-batch-size wins


def test_run_outputs_eval_modes_and_resume(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    full = tmp_path / "full"
    assert run_cli(tiny_args(full, data_dir)) == 0
    for name in ("config.json", "metrics.jsonl", "results.json", "model.pt", "u_noised.png", "noise/noise_samples.png",
                 "noise/noise_sampler_C.png", "samples/1.png", "samples/2.png", "stats/2.png",
                 *(f"model.{key}.pt" for key in no_diffusion.CHECKPOINT_METRICS)):
        assert (full / name).is_file(), name

    # eval: generate, plot, superres (2x the training grid)
    common_eval = ["eval", "--exp-dir", str(full), "--Ntest", "8", "--val-batch-size", "8", "--no-progress"]
    assert run_cli([*common_eval, "--mode", "generate", "--checkpoint", "model.w_total.pt"]) == 0
    assert run_cli([*common_eval, "--mode", "plot"]) == 0
    assert run_cli([*common_eval, "--mode", "superres"]) == 0
    superres = json.loads((full / "eval" / "superres.json").read_text())
    assert superres["grid"] == 32 and "w_total_ratio_to_native" in superres
    # Heun's levels from eval flags: the defaults spelled out change nothing; other levels, the same evaluations
    generate = lambda *extra: (run_cli([*common_eval, "--checkpoint", "model.w_total.pt", *extra]),
                               json.loads((full / "eval" / "generate.json").read_text()))
    _, default = generate()
    _, spelled = generate("--sigma-max", "30", "--rho", "7")
    assert spelled["w_total"] == default["w_total"] and spelled["spectrum"] == default["spectrum"]
    assert spelled["sampler_options"] == {**default["sampler_options"], "sigma_max": 30.0, "rho": 7.0}
    _, other = generate("--sigma-max", "5", "--rho", "3")
    assert other["w_total"] != default["w_total"] and other["evaluations_per_sample"] == default["evaluations_per_sample"]
    assert generate("--sigma-max", "0.001")[0] == 2 and generate("--sampler", "langevin", "--rho", "3")[0] == 2
    assert (full / "eval" / "histograms.png").is_file()

    # stopped mid-epoch by SIGTERM, then resumed: the same weights and metrics as the uninterrupted run
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(common, "StopSignal", helpers.StopAfter)
    assert run_cli(tiny_args(stopped, data_dir)) == 0
    assert not (stopped / "results.json").exists()
    monkeypatch.undo()
    assert run_cli(tiny_args(stopped, data_dir)) == 2           # model.pt exists: --resume needed
    assert run_cli(tiny_args(stopped, data_dir, "--resume")) == 0
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(stopped / "model.pt", weights_only=True)
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    results_a = json.loads((full / "results.json").read_text())
    results_b = json.loads((stopped / "results.json").read_text())
    assert all(results_a[key] == results_b[key] for key in no_diffusion.METRICS)


# ----------------------------------------------------------------------------------------------
# the structure candidates: EDM preconditioning, log-normal noise levels, the local convolution

def test_edm_preconditioning_and_its_loss_weight():
    """With F = 0 the EDM-parametrised model denoises x = u + sigma z by c_skip x = s_d^2 / (sigma^2 + s_d^2) x,
    the exact posterior mean for u ~ N(0, s_d^2 I) under white noise; and its weighted noise loss
    (1 + sigma^2 / s_d^2) |n - z|^2 equals EDM's |F - F_target|^2, F_target = (u - c_skip x) / c_out."""
    torch.manual_seed(0)
    sigma_data = 0.7
    model = no_diffusion.ScoreFNO(width=8, modes=4, layers=1, sigma_data=sigma_data)
    sigma = torch.tensor([0.05, 0.7, 3.0, 30.0])
    u, z = sigma_data * torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    x = u + sigma.view(-1, 1, 1, 1) * z
    network = model.network(x / torch.sqrt(sigma**2 + sigma_data**2).view(-1, 1, 1, 1), sigma)
    total = (sigma**2 + sigma_data**2).view(-1, 1, 1, 1)
    c_skip, c_out = sigma_data**2 / total, sigma.view(-1, 1, 1, 1) * sigma_data / total.sqrt()
    edm_loss = (network - (u - c_skip * x) / c_out).pow(2).mean((1, 2, 3))
    args = no_diffusion.parse_args(["--precondition", "edm"])
    noise_loss = (model(x, sigma) - z).pow(2).mean((1, 2, 3)) * no_diffusion.loss_weights(args, sigma, sigma_data)
    assert torch.allclose(noise_loss, edm_loss, rtol=1e-4)
    torch.nn.init.zeros_(model.project[-1].weight)
    torch.nn.init.zeros_(model.project[-1].bias)
    denoised = x - sigma.view(-1, 1, 1, 1) * model(x, sigma)
    assert torch.allclose(denoised, c_skip * x, atol=1e-4)                # float32 cancellation at sigma = 30
    plain = no_diffusion.parse_args(["--precondition", "none"])
    assert torch.equal(no_diffusion.loss_weights(plain, sigma, sigma_data), torch.ones(4))


def test_training_sigmas_levels_and_lognormal():
    sigmas = no_diffusion.geometric_sigmas(30.0, 0.01, 500)
    generator = torch.Generator().manual_seed(0)
    levels = no_diffusion.training_sigmas(no_diffusion.parse_args(["--sigma-sampling", "levels"]), sigmas, 1000,
                                           generator)
    assert all(float(value) in set(sigmas.tolist()) for value in levels[:50])
    args = no_diffusion.parse_args(["--sigma-sampling", "lognormal", "--sigma-mean", "-0.5", "--sigma-std", "1.0"])
    drawn = no_diffusion.training_sigmas(args, sigmas, 100000, generator)
    assert drawn.min() >= 0.01 and drawn.max() <= 30.0
    assert abs(float(drawn.log().mean()) + 0.5) < 0.02 and abs(float(drawn.log().std()) - 1.0) < 0.02


def test_local_convolution_sees_the_same_neighbourhood_at_twice_the_grid():
    """At 2x the grid the 3x3 local path is dilated by 2: on the even pixels it reads the same points of the
    domain as at the training grid, so for the same function its output there is the same."""
    torch.manual_seed(0)
    block = no_diffusion.FNOBlock(3, modes=4, emb_dim=0, local_grid=16)
    coarse, fine = smooth_function(16), smooth_function(32)
    local = lambda h: F.conv2d(h, block.local.weight, padding=max(1, round(h.shape[-1] / 16)),
                               dilation=max(1, round(h.shape[-1] / 16)))
    assert torch.allclose(local(fine)[..., ::2, ::2], local(coarse), atol=1e-5)
    model = no_diffusion.ScoreFNO(width=8, modes=4, layers=2, local_grid=16)
    assert model(torch.randn(2, 2, 32, 32), torch.tensor([1.0, 1.0])).shape == (2, 2, 32, 32)


def test_u_shaped_operator_keeps_its_coarse_grids_at_any_resolution(tmp_path):
    """--levels > 1: the coarse levels sit on grids fixed in units of the domain (the training grid / 2^l),
    so at 2x the input grid they have the same sizes; the model trains, resumes and samples on 2x the grid."""
    torch.manual_seed(0)
    model = no_diffusion.ScoreFNO(width=4, modes=4, levels=3, local_grid=16, sigma_data=0.7)
    sizes = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape[-2:])))
             for block in (*model.down, model.middle)]
    for grid in (16, 32):
        out = model(torch.randn(2, 2, grid, grid), torch.tensor([0.5, 2.0]))
        assert out.shape == (2, 2, grid, grid) and torch.isfinite(out).all()
    for hook in hooks:
        hook.remove()
    pad = lambda n: n + round(0.125 * n)
    assert sizes == [(pad(16),) * 2, (9, 9), (4, 4), (4, 4), (pad(32),) * 2, (9, 9), (4, 4), (4, 4)]
    run = tmp_path / "uno"
    assert run_cli(tiny_args(run, tmp_path / "data", "--levels", "2")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["levels"] == 2
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    assert checkpoint["meta"]["model_args"]["levels"] == 2 and checkpoint["meta"]["model_args"]["local_grid"] == 16
    assert run_cli(["eval", "--exp-dir", str(run), "--Ntest", "4", "--val-batch-size", "4", "--no-progress",
                    "--mode", "superres", "--checkpoint", "model.pt"]) == 0
    assert json.loads((run / "eval" / "superres.json").read_text())["grid"] == 32
