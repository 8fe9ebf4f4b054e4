"""Benchmark of the default MNIST1D sweep against the targets of BENCHMARKS.md.

    python bench/bench_mnist1d.py                      # cold: fresh data dir (dataset + classifier made)
    python bench/bench_mnist1d.py --data-dir ./data    # warm: reuse the cached dataset and classifier

Runs `mnist1d_semi_implicit.py` with its defaults (8 configs), times the whole sweep, prints the
machine-calibration figure (bench/calibration.py) beside the time, a markdown table, and one PASS/FAIL
line per target (issue 11; the forward MSE is judged against the best linear denoiser, issue 8):
  1. the sweep finishes in <= 300 s (on an idle 2-core machine; compare machines by the calibration);
  2. every implicit config's forward MSE < the best linear denoiser's, overall;
  3. the best config's forward MSE <= 0.85 x the linear denoiser's in the mid-noise band;
  4. the best config's sample Fréchet distance <= 1.5 x the real-vs-real value;
  5. the best config's sample accuracy >= 0.85.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist1d_semi_implicit  # noqa: E402
from bench.calibration import calibration_line  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", default=None, help="run directory (default: a new temporary one)")
    parser.add_argument("--data-dir", default=None, help="data cache (default: a new temporary one, i.e. a cold start)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per config (the time target is for 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default, all cores)")
    args = parser.parse_args()
    outdir = args.outdir or tempfile.mkdtemp(prefix="bench-mnist1d-")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench-mnist1d-data-")

    started = time.time()
    results = mnist1d_semi_implicit.main(["--outdir", outdir, "--data-dir", data_dir, "--no-progress",
                                          "--seeds", str(args.seeds), "--threads", str(args.threads)])
    wall = time.time() - started
    baselines, reference = results["baselines"], results["reference"]
    linear = baselines["linear_denoiser"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {results['device']}")
    print(calibration_line())
    print(f"sweep wall time: {wall:.0f} s ({'cold' if args.data_dir is None else 'warm'} start), run dir {outdir}\n")
    print("| config | forward MSE | / linear | / linear (band) | inverse MSE | KL (nats/dim) | sample FD | / real FD | sample acc | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in results["configs"]:
        print(f"| {c['name']} | {c['test_mse_forward']:.4f} | {c['linear_ratio']:.3f} | {c['linear_ratio_band']:.3f} | "
              f"{c['test_mse_inverse']:.4f} | {c['test_kl']:.3f} | {c['sample_fd']:.1f} | "
              f"{c['sample_fd'] / reference['real_fd']:.2f} | {c['sample_accuracy']:.3f} | {c['runtime_s']:.0f} |")
    print("\nbest linear denoiser: " + "; ".join(f"{noise} {ref['mse']:.4f} overall, {ref['band_mse']:.4f} in the "
                                               f"mid-noise band t {ref['band_t'][0]}..{ref['band_t'][1]}"
                                               for noise, ref in linear.items()))
    print(f"context: predict zero {baselines['predict_zero_mse']:.4f}, class mean {baselines['class_mean_mse']:.4f}; "
          f"inverse: predict zero {baselines['inverse_predict_zero_mse']:.4f}, class mean {baselines['inverse_class_mean_mse']:.4f}")
    print(f"reference: real-vs-real FD {reference['real_fd']:.2f}, classifier accuracy on real test {reference['real_accuracy']:.3f}\n")

    implicit = [c for c in results["configs"] if c["training"] == "implicit"]
    worst_implicit = max(implicit, key=lambda c: c["linear_ratio"])
    best_band = min(results["configs"], key=lambda c: c["linear_ratio_band"])
    best_fd = min(results["configs"], key=lambda c: c["sample_fd"])
    best_accuracy = max(results["configs"], key=lambda c: c["sample_accuracy"])
    checks = [
        (f"sweep wall time {wall:.0f} s <= 300 s", wall <= 300),
        (f"every implicit config beats the linear denoiser overall (worst {worst_implicit['name']} "
         f"{worst_implicit['linear_ratio']:.3f} x)", worst_implicit["linear_ratio"] < 1),
        (f"best mid-noise-band ratio {best_band['linear_ratio_band']:.3f} ({best_band['name']}) <= 0.85",
         best_band["linear_ratio_band"] <= 0.85),
        (f"best sample FD {best_fd['sample_fd']:.1f} ({best_fd['name']}) <= 1.5 x real {reference['real_fd']:.1f}",
         best_fd["sample_fd"] <= 1.5 * reference["real_fd"]),
        (f"best sample accuracy {best_accuracy['sample_accuracy']:.3f} ({best_accuracy['name']}) >= 0.85",
         best_accuracy["sample_accuracy"] >= 0.85),
    ]
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")


if __name__ == "__main__":
    main()
