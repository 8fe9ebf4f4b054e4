"""Benchmarks of no_diffusion.py (numbers in BENCHMARKS.md).

    python bench/bench_no_diffusion.py noise                                   # FFT noise vs dense Cholesky
    python no_diffusion.py --outdir runs/nodiff                                 # the default command
    python no_diffusion.py --outdir runs/nodiff-ablation --no-sigma-embedding --epochs 100 \\
        --record-interval 100 --max-minutes <the default run's train_time_s / 60>   # equal training time
    python bench/bench_no_diffusion.py samplers --run-dir runs/nodiff --samples 256 --langevin-samples 256
    python bench/bench_no_diffusion.py superres --run-dir runs/nodiff --samples 256
    python bench/bench_no_diffusion.py ablation --run-dir runs/nodiff --ablation-dir runs/nodiff-ablation

Every part prints the machine-calibration line (bench/calibration.py) beside its times and writes its
numbers as JSON to --out (default bench/runs/no_diffusion-<part>.json). --threads sets torch's threads (1 on
a shared machine).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import no_diffusion  # noqa: E402
from calibration import calibration_line  # noqa: E402


def best_of(function, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def dense_cholesky_noise(n, kernel, scale, nugget):
    """The reference's sampler: the dense (n^2 x n^2) covariance, its Cholesky factor, one sample at a time."""
    index = torch.arange(n * n)
    coords = torch.stack([index // n, index % n], dim=1).float() / n
    covariance = no_diffusion.kernel_values(torch.cdist(coords, coords), kernel, scale) + nugget**2 * torch.eye(n * n)
    factor = torch.linalg.cholesky(covariance)

    def draw(count, generator):
        samples = torch.zeros(count, n * n, 2)
        for i in range(count):
            samples[i] = factor @ torch.randn(n * n, 2, generator=generator)
        return samples.view(count, n, n, 2)
    return factor, draw


def bench_noise(args):
    rows = []
    for kernel in ("se", "exponential"):
        noise = no_diffusion.GaussianNoise(128, "rbf", kernel, 0.05, 0.01)
        generator = torch.Generator().manual_seed(0)
        seconds = best_of(lambda: noise.draw(1024, generator))
        rows.append({"what": f"FFT circulant embedding, {kernel}, 1,024 samples at 128x128", "seconds": seconds,
                     "torus": noise.m, "memory_MB": noise.m**2 * 4 / 1e6, "target_s": 1.0, "met": seconds < 1.0})
    n, count = args.dense_size, args.dense_samples
    start = time.perf_counter()
    factor, draw = dense_cholesky_noise(n, "exponential", 0.05, 0.01)
    setup = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    dense = best_of(lambda: draw(count, generator), repeats=1)
    fft = no_diffusion.GaussianNoise(n, "rbf", "exponential", 0.05, 0.01)
    fft_seconds = best_of(lambda: fft.draw(count, generator))
    rows.append({"what": f"dense Cholesky (the reference's), exponential, {count} samples at {n}x{n}",
                 "seconds": dense, "setup_s": setup, "memory_MB": factor.numel() * 4 / 1e6})
    rows.append({"what": f"FFT circulant embedding, exponential, {count} samples at {n}x{n}", "seconds": fft_seconds,
                 "memory_MB": fft.m**2 * 4 / 1e6})
    rows.append({"what": "dense covariance at 120x120 (the reference's size), float32", "memory_MB": (120**2) ** 2 * 4 / 1e6})
    return rows


def load(run_dir, checkpoint):
    args, model = no_diffusion.load_run(run_dir, checkpoint, "cpu")
    return args, model


def sample_and_score(args, model, count, sampler, options, resolution_scale=1, seed=1):
    data = no_diffusion.load_functions(args.dataset, args.resolution * resolution_scale, args.crop * resolution_scale,
                                       args.n_functions, args.val_size, args.data_dir, args.seed)
    size = data["train"].shape[-1]
    noise = no_diffusion.GaussianNoise(size, args.noise, args.kernel, args.rbf_scale, args.rbf_eps)
    sigmas = no_diffusion.geometric_sigmas(args.sigma_1, args.sigma_L, args.L)
    batch_size = no_diffusion.sampling_batch_size(None, torch.device("cpu"), size)
    samples, evaluations, seconds = no_diffusion.generate_functions(model, noise, sigmas, count, sampler, options,
                                                                    batch_size, seed, "cpu", progress=False)
    scoring = no_diffusion.prepare_scoring(data, count, args.data_dir)
    metrics = no_diffusion.score(samples, scoring)
    print(f"{sampler} {options} at {size} px, {count} samples: " + "\n  ".join(no_diffusion.score_lines(metrics, scoring)),
          flush=True)
    return {"grid": size, "count": count, "sampler": sampler, "options": options, "evaluations": evaluations,
            "seconds": seconds, "seconds_per_256": seconds * 256 / count, **metrics, "floor": scoring["floor"],
            "floor_spread": scoring["spread"], "floor_count": scoring["count"],
            "verdicts": no_diffusion.verdicts(metrics, scoring)}


def bench_samplers(args):
    run_args, model = load(args.run_dir, args.checkpoint)
    rows = [sample_and_score(run_args, model, args.samples, "heun", {"steps": run_args.steps, "churn": run_args.churn})]
    rows.append(sample_and_score(run_args, model, args.langevin_samples, "langevin", {"T": 3, "epsilon": 6e-6}))
    if args.langevin_samples != args.samples:  # the fast sampler again at the Langevin sample count
        rows.append(sample_and_score(run_args, model, args.langevin_samples, "heun",
                                     {"steps": run_args.steps, "churn": run_args.churn}))
    for row in rows:
        row["w_total_over_floor"] = row["w_total"] / row["floor"]["w_total"]
    return rows


def bench_superres(args):
    run_args, model = load(args.run_dir, args.checkpoint)
    options = {"steps": run_args.steps, "churn": run_args.churn}
    native = sample_and_score(run_args, model, args.samples, "heun", options)
    double = sample_and_score(run_args, model, args.samples, "heun", options, resolution_scale=2)
    return [native, double, {"w_total_ratio": double["w_total"] / native["w_total"],
                             "worst_ratio_native": native["worst_ratio"], "worst_ratio_double": double["worst_ratio"]}]


def bench_ablation(args):
    rows = []
    for label, directory in (("sigma-conditioned (ours)", args.run_dir), ("--no-sigma-embedding (reference design)", args.ablation_dir)):
        with open(os.path.join(directory, "results.json")) as file:
            results = json.load(file)
        rows.append({"model": label, "train_time_s": results["train_time_s"], "steps": results["steps"],
                     **{key: results.get(key) for key in no_diffusion.METRICS + no_diffusion.STRUCTURE
                        + ("source_found", "worst_ratio")},
                     "floor": results["floor"],
                     "evaluations": results["evaluations_per_sample"], "Ntest": results["Ntest"]})
    return rows


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("noise", "samplers", "superres", "ablation"), help="which benchmark")
    parser.add_argument("--run-dir", help="a finished no_diffusion.py run (the default command's)")
    parser.add_argument("--ablation-dir", help="the --no-sigma-embedding run (ablation)")
    parser.add_argument("--checkpoint", default="model.pt", help="checkpoint in --run-dir (its EMA weights are used)")
    parser.add_argument("--samples", type=common.positive_int, default=256, help="samples for the fast sampler")
    parser.add_argument("--langevin-samples", type=common.positive_int, default=256, help="samples for Langevin (1,500 evaluations each)")
    parser.add_argument("--dense-size", type=common.positive_int, default=48, help="grid of the dense-Cholesky comparison")
    parser.add_argument("--dense-samples", type=common.positive_int, default=256, help="samples in the dense comparison")
    parser.add_argument("--threads", type=common.positive_int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="JSON output (default bench/runs/no_diffusion-<part>.json)")
    args = parser.parse_args()
    if args.part in ("samplers", "superres", "ablation") and not args.run_dir:
        parser.error(f"{args.part} needs --run-dir")
    if args.part == "ablation" and not args.ablation_dir:
        parser.error("ablation needs --ablation-dir")
    calibration = calibration_line()
    print(calibration, flush=True)
    torch.set_num_threads(args.threads)
    rows = {"noise": bench_noise, "samplers": bench_samplers, "superres": bench_superres, "ablation": bench_ablation}[args.part](args)
    for row in rows:
        print(json.dumps(row, default=float))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", f"no_diffusion-{args.part}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    common.write_json(out, {"threads": args.threads, "calibration": calibration, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run_main(main)
