"""Benchmark of mnist_text_cfg.py against the targets of issues 9 and 21 / BENCHMARKS.md.

    python bench/bench_text_cfg.py --data-dir ./data                    # full MNIST, the default command
    python bench/bench_text_cfg.py --threads 1 --final-samples 500 --compare-samples 20   # a small, busy machine

Runs, as a user would, the default training command (10 minutes of training, `--max-minutes 10`) timed end to
end, then reads its results.json:
  - prompt accuracy (DPM-Solver++ 20 steps, the default guidance)        target >= 99% (CPU, <= 10 min of training)
  - held-out prompt accuracy (templates never seen in training)          target >= 97%
  - classifier ("lenet") FID beside its same-N floor (real train vs test images, same count), target <= 3x it,
    and within-prompt diversity beside real images' diversity, target >= 0.9x (issue 21; printed without a verdict:
    one training seed gives no spread)
and then samples the same checkpoint with DPM-Solver++ 20 steps and with 1000-step DDPM (same prompts, same
guidance, same seeds; `--compare-seeds N` averages N sampling seeds): target within 1 point of prompt accuracy
and 10% of classifier FID. The SDE forms of DPM-Solver++(2M) and (3M) (`--sampler dpmpp-sde`, `dpmpp-3m-sde`,
20 steps) are scored beside them.
Prints calibration_line() (bench/calibration.py) beside the times, writes <outdir>/bench.json and a Markdown table.
Extra arguments after `--` go to mnist_text_cfg.py (e.g. `-- --epochs 3 --max-minutes 0`).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import mnist_text_cfg  # noqa: E402
from calibration import calibration_line  # noqa: E402

# below this many samples a classifier FID moves by more than the 10% the comparison judges: no verdict
MIN_COMPARE_SAMPLES = 500


def parse_args():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="MNIST and the cached classifier")
    parser.add_argument("--dataset", choices=common.DATASETS, default="auto", help="mnist, mnist5k or auto")
    parser.add_argument("--outdir", default="bench/runs-text-cfg", help="where the run and bench.json go")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the run (0 = torch's default)")
    parser.add_argument("--final-samples", type=common.positive_int, default=2000, help="samples of the final evaluation")
    parser.add_argument("--heldout-samples", type=common.positive_int, default=600, help="samples of held-out prompts")
    parser.add_argument("--compare-samples", type=int, default=200,
                        help="samples of the DPM-Solver++ 20 vs DDPM 1000 comparison (0 = skip it; below "
                             f"{MIN_COMPARE_SAMPLES} it is printed but not judged)")
    parser.add_argument("--compare-seeds", type=common.positive_int, default=1,
                        help="sampling seeds (7, 8, ...) of that comparison; each sampler's mean over them is judged")
    parser.add_argument("--shared", action="store_true", help="record that the machine was shared with other jobs")
    args, extra = parser.parse_known_args()
    if args.compare_samples < 0:
        parser.error("--compare-samples must be >= 0")
    return args, [a for a in extra if a != "--"]


def run_training(args, extra):
    """Run the default training command (plus `extra`) as a user would, timed end to end; returns (its argv,
    wall seconds, its results.json)."""
    run_dir = os.path.join(args.outdir, "default")
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, "mnist_text_cfg.py", "--data-dir", args.data_dir, "--dataset", args.dataset, "--outdir", run_dir,
            "--threads", str(args.threads), "--final-samples", str(args.final_samples),
            "--heldout-samples", str(args.heldout_samples), "--no-progress", *extra]
    print("running:", " ".join(argv[1:]), flush=True)
    start = time.time()
    with open(os.path.join(args.outdir, "default.log"), "w") as log:
        status = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if status != 0:
        raise SystemExit(f"the training run failed with status {status}; see {args.outdir}/default.log")
    with open(os.path.join(run_dir, "results.json")) as file:
        return argv, wall, json.load(file)


def few_step_comparison(args, results, seeds):
    """The run's checkpoint sampled by DPM-Solver++ 20 steps (ODE and SDE forms) and DDPM 1000, with the same
    prompts, the run's guidance (its scale and noise interval) and the same sampling seeds: per sampler the mean
    accuracy and FID over the seeds, the FID's std and each seed's figures."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device("auto")
    model, meta = mnist_text_cfg.load_model(results["checkpoint"], device)
    process = common.make_process("gaussian", meta["T"], "cosine")
    data = common.load_mnist(args.dataset, args.data_dir, device)
    evaluator = mnist_text_cfg.Evaluator(data, args.data_dir, device, "lenet", None, meta["text_encoder"],
                                         meta.get("text_encoder_path"), args.data_dir)
    table = mnist_text_cfg.table_to(mnist_text_cfg.caption_table(meta["text_encoder"], meta.get("text_encoder_path"),
                                                                 mnist_text_cfg.train_captions(), args.data_dir), device)
    null_id = len(mnist_text_cfg.train_captions()) - 1
    interval = results.get("guidance_interval", "all")   # "all" = every step
    interval = None if interval == "all" else common.noise_interval(interval)
    compare = {}
    for sampler, steps in (("dpmpp", 20), ("dpmpp-sde", 20), ("dpmpp-3m-sde", 20), ("ddpm", 1000)):
        runs = []
        for seed in seeds:
            metrics, _ = evaluator(model, process, table, null_id, args.compare_samples, 0, results["guidance_scale"],
                                   sampler, steps, seed=seed, full=False, interval=interval)
            runs.append({k: metrics[k] for k in ("prompt_accuracy", "fid", "fid_floor", "samples", "sampling_seconds")})
            print(f"{sampler} {steps} steps, seed {seed}: prompt accuracy {metrics['prompt_accuracy']:.1%}, lenet FID "
                  f"{metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}, {metrics['samples']} samples, "
                  f"{metrics['sampling_seconds']:.0f} s)", flush=True)
        mean = lambda key: sum(run[key] for run in runs) / len(runs)
        fids = [run["fid"] for run in runs]
        compare[f"{sampler}-{steps}"] = {"prompt_accuracy": mean("prompt_accuracy"), "fid": mean("fid"),
                                         "fid_floor": mean("fid_floor"),
                                         "fid_std": float(torch.tensor(fids).std()) if len(fids) > 1 else 0.0,
                                         "samples": runs[0]["samples"], "seeds": seeds, "per_seed": runs}
    return compare


def summary_rows(results, compare, seeds):
    """The Markdown table's rows: (measure, value, target or reference, verdict)."""
    rows = [
        (f"prompt accuracy (DPM++ 20, w = {results['guidance_scale']:g}, guidance interval "
         f"{results.get('guidance_interval', 'all')})", f"{results['prompt_accuracy']:.2%}", ">= 99%",
         "met" if results["prompt_accuracy"] >= 0.99 else "not met"),
        ("held-out prompt accuracy", f"{results.get('heldout_prompt_accuracy', float('nan')):.2%}", ">= 97%",
         "met" if results.get("heldout_prompt_accuracy", 0) >= 0.97 else "not met"),
        (f"classifier FID ({results['samples']} samples; one training seed, its spread not measured here)",
         f"{results['fid']:.2f} = {results['fid'] / results['fid_floor']:.1f}x its floor",
         f"<= 3x the floor (real, same N) {results['fid_floor']:.2f}", ""),
        ("within-prompt diversity (one training seed)",
         f"{results['diversity']:.2f} = {results['diversity'] / results['reference']['diversity']:.2f}x real",
         f">= 0.9x real images' {results['reference']['diversity']:.2f}", ""),
        ("training time", f"{results['train_seconds'] / 60:.1f} min ({results['steps']} steps, "
         f"{results['images_per_second']:.0f} images/s)", "<= 10 min", ""),
    ]
    if compare:
        many = compare["ddpm-1000"]
        judged = many["samples"] >= MIN_COMPARE_SAMPLES
        verdict = lambda ok: ("met" if ok else "not met") if judged else f"not judged (< {MIN_COMPARE_SAMPLES} samples)"
        spread = lambda entry: f" ± {entry['fid_std']:.2f}" if len(seeds) > 1 else ""
        for key, name in (("dpmpp-20", "DPM++ 20"), ("dpmpp-sde-20", "DPM++ SDE 20 (`dpmpp-sde`)"),
                          ("dpmpp-3m-sde-20", "DPM++ 3M SDE 20 (`dpmpp-3m-sde`)")):
            few = compare[key]
            rows.append((f"{name} vs DDPM 1000 ({few['samples']} samples, {len(seeds)} seed(s)): "
                         "accuracy / classifier FID",
                         f"{few['prompt_accuracy']:.1%} / {few['fid']:.2f}{spread(few)} vs "
                         f"{many['prompt_accuracy']:.1%} / {many['fid']:.2f}{spread(many)}", "within 1 point / 10%",
                         verdict(abs(few["prompt_accuracy"] - many["prompt_accuracy"]) <= 0.01
                                 and few["fid"] <= 1.1 * many["fid"])))
    return rows


def main():
    args, extra = parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    calibration = calibration_line()
    print(calibration, flush=True)
    argv, wall, results = run_training(args, extra)
    seeds = [7 + i for i in range(args.compare_seeds)]
    compare = few_step_comparison(args, results, seeds) if args.compare_samples else {}
    bench = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
             "threads": args.threads or torch.get_num_threads(), "shared": args.shared, "calibration": calibration,
             "command": " ".join(argv[1:]), "wall_seconds": wall, "results": results, "few_step_comparison": compare}
    common.write_json(os.path.join(args.outdir, "bench.json"), bench)
    print(f"\n{calibration}; {bench['threads']} thread(s){', shared machine' if args.shared else ''}; "
          f"end-to-end wall time {wall / 60:.1f} min\n")
    print("| measure | value | target / reference | |\n|---|---|---|---|")
    for row in summary_rows(results, compare, seeds):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    common.run_main(main)
