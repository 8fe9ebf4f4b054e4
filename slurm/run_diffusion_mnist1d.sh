#!/bin/bash
# The MNIST1D sweep (8 configs, ~5 min on 2 cores) as one CPU job, requeued on preemption.
#
#   export SBATCH_MAIL_USER=<your address>     # e-mail on END/FAIL goes here; never written in this file
#   sbatch slurm/run_diffusion_mnist1d.sh       # extra flags are passed on: ... --seeds 3 --epochs 60
#
# Environment: VENV_DIR (default .venv, made by the README's install command), OUTDIR
# (default runs/mnist1d-<job id>; a requeued job keeps its id, so it resumes into the same directory).
#SBATCH --job-name=diffusion-mnist1d
#SBATCH --partition=short
#SBATCH --cpus-per-task=4
#SBATCH --mem=64G
#SBATCH --time=01:00:00
#SBATCH --mail-type=END,FAIL
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source "${VENV_DIR:-.venv}/bin/activate"
OUTDIR="${OUTDIR:-runs/mnist1d-${SLURM_JOB_ID:-local}}"

python mnist1d_semi_implicit.py --check
RESUME=()
[ -d "$OUTDIR/runs" ] && RESUME=(--resume)
python mnist1d_semi_implicit.py --outdir "$OUTDIR" --threads "${SLURM_CPUS_PER_TASK:-4}" --no-progress "${RESUME[@]}" "$@" &
child=$!
# Time limit or preemption: the script checkpoints and exits; then put the job back in the queue.
trap 'kill -USR1 "$child"; wait "$child"; [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1 TERM
wait "$child"
