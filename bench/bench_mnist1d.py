"""Benchmark of the default MNIST1D sweep against the targets of BENCHMARKS.md.

    python bench/bench_mnist1d.py                      # cold: fresh data dir (dataset + classifier made)
    python bench/bench_mnist1d.py --data-dir ./data    # warm: reuse the cached dataset and classifier

Runs `mnist1d_semi_implicit.py` with its defaults (8 configs), times the whole sweep, and prints a
markdown table plus one PASS/FAIL line per target:
  1. the sweep finishes in <= 300 s;
  2. every config's forward test MSE <= 0.5 x the better trivial baseline;
  3. the best config's sample Fréchet distance <= 3 x the real-vs-real value.
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
    better_baseline = min(baselines["predict_zero_mse"], baselines["class_mean_mse"])
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {results['device']}")
    print(f"sweep wall time: {wall:.0f} s ({'cold' if args.data_dir is None else 'warm'} start), run dir {outdir}\n")
    print("| config | forward MSE | / better baseline | inverse MSE | KL (nats/dim) | sample FD | / real FD | sample acc | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in results["configs"]:
        print(f"| {c['name']} | {c['test_mse_forward']:.4f} | {c['test_mse_forward'] / better_baseline:.2f} | "
              f"{c['test_mse_inverse']:.4f} | {c['test_kl']:.3f} | {c['sample_fd']:.1f} | "
              f"{c['sample_fd'] / reference['real_fd']:.2f} | {c['sample_accuracy']:.3f} | {c['runtime_s']:.0f} |")
    print(f"\nbaselines: predict zero {baselines['predict_zero_mse']:.4f}, class mean {baselines['class_mean_mse']:.4f}; "
          f"inverse: predict zero {baselines['inverse_predict_zero_mse']:.4f}, class mean {baselines['inverse_class_mean_mse']:.4f}")
    print(f"reference: real-vs-real FD {reference['real_fd']:.2f}, classifier accuracy on real test {reference['real_accuracy']:.3f}\n")

    worst_ratio = max(c["test_mse_forward"] / better_baseline for c in results["configs"])
    best = min(results["configs"], key=lambda c: c["sample_fd"])
    checks = [
        (f"sweep wall time {wall:.0f} s <= 300 s", wall <= 300),
        (f"worst forward MSE / better baseline = {worst_ratio:.2f} <= 0.5", worst_ratio <= 0.5),
        (f"best sample FD {best['sample_fd']:.1f} ({best['name']}) <= 3 x real {reference['real_fd']:.1f}",
         best["sample_fd"] <= 3 * reference["real_fd"]),
    ]
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")


if __name__ == "__main__":
    main()
