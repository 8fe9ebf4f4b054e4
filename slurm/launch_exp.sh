#!/bin/bash
# Train and evaluate no_diffusion.py on one GPU: score-based diffusion in function space.
#
#   sbatch slurm/launch_exp.sh json/rbf.json                        # from the repository root
#   sbatch slurm/launch_exp.sh json/indep.json --max-minutes 30     # extra flags override the JSON file
#   DATA_DIR=/path/to/volcano/ints sbatch --time=2-00:00:00 slurm/launch_exp.sh json/rbf-reference.json
#   SAVEDIR=/tmp/try bash slurm/launch_exp.sh json/rbf.json --epochs 1 --Ntest 16   # local run, no SLURM
#   sbatch --gres=gpu:0 -c 2 --mem=8G slurm/launch_exp.sh json/rbf.json --epochs 1   # on slurm/local_cluster.sh (CPU)
#
# Outputs go to $SAVEDIR/<run id>/<experiment name> (SAVEDIR defaults to runs; the run id is the SLURM job id,
# which a requeued job keeps, so it resumes in the same directory). Preemption and time limits: SLURM sends
# SIGUSR1 to this shell two minutes before the end (--signal); it is forwarded to Python, which checkpoints
# and exits cleanly; the job requeues itself and continues with --resume. After training, the chosen
# checkpoint is evaluated (generate, plot, superres) into <run dir>/eval/.
#SBATCH --job-name=no-diffusion
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=1-00:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -f "${VENV_DIR:-.venv}/bin/activate" ]; then source "${VENV_DIR:-.venv}/bin/activate"; fi  # else the python on PATH

CONFIG=${1:?usage: launch_exp.sh <json/experiment.json> [more no_diffusion.py flags]}
shift
NAME=$(basename "$CONFIG" .json)
RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
RUN_DIR="${SAVEDIR:-runs}/$RUN_ID/$NAME"
CHECKPOINT=${CHECKPOINT:-model.w_total.pt}
EVAL_FLAGS=${EVAL_FLAGS:-}   # more (or overriding) eval flags, e.g. "--Ntest 256"
RESUME=""
[ -f "$RUN_DIR/model.pt" ] && RESUME="--resume"

source slurm/requeue.sh  # run_step: forwards USR1/TERM to the step, then requeues the job

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ ! -f "$RUN_DIR/results.json" ]; then
    run_step python no_diffusion.py --config "$CONFIG" --outdir "$RUN_DIR" --no-progress $RESUME "$@"
fi
for mode in generate plot superres; do
    run_step python no_diffusion.py eval --exp-dir "$RUN_DIR" --checkpoint "$CHECKPOINT" --Ntest 1024 \
        --val-batch-size 128 --mode "$mode" --no-progress $EVAL_FLAGS
done
