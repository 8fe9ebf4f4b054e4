#!/bin/bash
# The MNIST1D sweep on SLURM, requeued on preemption. Two ways to run it:
#
#   export SBATCH_MAIL_USER=<your address>          # e-mail on END/FAIL goes here; never written in this file
#   sbatch slurm/run_diffusion_mnist1d.sh            # all 8 configs in one CPU job (4-16 min on 2 idle cores)
#   sbatch --array=0-7 slurm/run_diffusion_mnist1d.sh   # one config per array task, all into one outdir
#   python mnist1d_semi_implicit.py report --outdir runs/mnist1d-<array job id>   # merge what has finished
#   sbatch -c 1 --mem=2G --array=0-7 slurm/run_diffusion_mnist1d.sh --epochs 1   # on slurm/local_cluster.sh
#
# Extra arguments are passed on to the script (... --seeds 3 --epochs 60); give every array task the same.
# In an array each task merges the finished configs into results.json/report.md when it ends, so the
# last task to end leaves the full report; `report` can be run again at any time.
# Environment: VENV_DIR (default .venv, made by the README's install command), OUTDIR (default
# runs/mnist1d-<job id>, the array's job id for an array; a requeued job keeps its id, so it resumes there).
#SBATCH --job-name=diffusion-mnist1d
#SBATCH --partition=short
#SBATCH --cpus-per-task=4
#SBATCH --mem=64G
#SBATCH --time=01:00:00
#SBATCH --mail-type=END,FAIL
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -f "${VENV_DIR:-.venv}/bin/activate" ]; then source "${VENV_DIR:-.venv}/bin/activate"; fi  # else the python on PATH
CONFIGS=(mse-gaussian-implicit mse-gaussian-semi-implicit mse-convex-implicit mse-convex-semi-implicit
         kl-gaussian-implicit kl-gaussian-semi-implicit kl-convex-implicit kl-convex-semi-implicit)

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    OUTDIR="${OUTDIR:-runs/mnist1d-${SLURM_ARRAY_JOB_ID}}"
    CONFIG="${CONFIGS[$SLURM_ARRAY_TASK_ID]:?array index must be 0-7}"
    SELECT=(--configs "$CONFIG" --resume)  # tasks share the outdir: each continues (or starts) its own config
else
    OUTDIR="${OUTDIR:-runs/mnist1d-${SLURM_JOB_ID:-local}}"
    SELECT=()
    [ -d "$OUTDIR/runs" ] && SELECT=(--resume)
fi

python mnist1d_semi_implicit.py --check "$@"   # seconds: imports, data, device, one step, with the run's flags
python mnist1d_semi_implicit.py --outdir "$OUTDIR" --threads "${SLURM_CPUS_PER_TASK:-4}" --no-progress "${SELECT[@]}" "$@" &
child=$!
# Time limit or preemption: the script checkpoints and exits; then put the job back in the queue.
trap 'kill -USR1 "$child"; wait "$child"; [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1 TERM
wait "$child"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    python mnist1d_semi_implicit.py report --outdir "$OUTDIR"
fi
