#!/bin/bash
# Train an MNIST autoencoder, then latent diffusion on its latents (autoencoders.py, latent_diffusion.py).
#
#   sbatch slurm/train_latent.sh                                   # from the repository root
#   sbatch --mail-user="$EMAIL" --mail-type=END,FAIL slurm/train_latent.sh
#   AE_MODEL=mlp AE_EPOCHS=20 EPOCHS=50 ONLY_DIGIT=7 sbatch -p short slurm/train_latent.sh
#   DATASET=mnist5k AE_EPOCHS=1 EPOCHS=1 OUTDIR=/tmp/try LATENT_FLAGS="--eval-samples 500" \
#       bash slurm/train_latent.sh                                 # local dry run, no SLURM
#   DATASET=mnist5k AE_EPOCHS=1 EPOCHS=1 sbatch --gres=gpu:0 -c 2 --mem=8G slurm/train_latent.sh   # slurm/local_cluster.sh
#
# Preemption and time limits: SLURM sends SIGUSR1 to this shell two minutes before the end (--signal);
# it is forwarded to the Python process, which checkpoints and exits cleanly; the job then requeues
# itself and both steps continue where they stopped (--resume / --auto-resume). A finished step is
# skipped on the next run. Outputs go to $OUTDIR (default runs/).
#SBATCH --job-name=latent-diffusion
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -f "${VENV_DIR:-.venv}/bin/activate" ]; then source "${VENV_DIR:-.venv}/bin/activate"; fi  # else the python on PATH

AE_MODEL=${AE_MODEL:-conv}
AE_EPOCHS=${AE_EPOCHS:-12}
EPOCHS=${EPOCHS:-125}
OUTDIR=${OUTDIR:-runs}
DATASET=${DATASET:-auto}
DIGIT_FLAG=${ONLY_DIGIT:+--only-digit $ONLY_DIGIT}
WANDB=${WANDB:-off}
AE_FLAGS=${AE_FLAGS:-}           # more autoencoders.py flags, e.g. "--tsne-points 500"
LATENT_FLAGS=${LATENT_FLAGS:-}   # more latent_diffusion.py flags, e.g. "--hidden-dim 512 --ema-decay 0.9999"

source slurm/requeue.sh  # run_step: forwards USR1/TERM to the step, then requeues the job

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 1. the autoencoder (skipped when a finished one is there)
if [ ! -f "$OUTDIR/ae-$AE_MODEL/results.json" ]; then
    run_step python autoencoders.py --model "$AE_MODEL" --epochs "$AE_EPOCHS" --outdir "$OUTDIR/ae-$AE_MODEL" \
        --dataset "$DATASET" --tsne --resume --no-progress --wandb "$WANDB" $AE_FLAGS
fi

# 2. latent diffusion on its latents, evaluated at the end into <run>/results.json
run_step python latent_diffusion.py --ae-ckpt "$OUTDIR/ae-$AE_MODEL/ae-$AE_MODEL.pt" --outdir "$OUTDIR" \
    --dataset "$DATASET" --epochs "$EPOCHS" $DIGIT_FLAG --generate-images --auto-resume --no-progress --wandb "$WANDB" $LATENT_FLAGS
