#!/bin/bash
# Text-conditioned MNIST diffusion (mnist_text_cfg.py) with DDP: 2 GPUs on one node by default.
#
#   sbatch slurm/train_mnist.sh                                    # from the repository root: 2 GPUs, 1 node
#   sbatch --nodes 2 slurm/train_mnist.sh                          # 2 nodes x 2 GPUs (torchrun rendezvous below)
#   sbatch --gres=gpu:4 --export=ALL,GPUS_PER_NODE=4 slurm/train_mnist.sh
#   EPOCHS=20 TEXT_ENCODER=class FLAGS="--batch-size 256" sbatch slurm/train_mnist.sh
#   GPUS_PER_NODE=1 EPOCHS=1 OUTDIR=/tmp/try FLAGS="--dataset mnist5k --device cpu" bash slurm/train_mnist.sh  # local dry run
#   GPUS_PER_NODE=2 EPOCHS=1 FLAGS="--dataset mnist5k --device cpu" sbatch --gres=gpu:0 -c 2 --mem=8G slurm/train_mnist.sh
#                                                # on slurm/local_cluster.sh: 2 gloo processes on the CPU
#
# One torchrun per node (srun --ntasks-per-node=1); torchrun starts GPUS_PER_NODE processes there and they meet
# at the first node of the allocation (c10d rendezvous, port RDZV_PORT). --batch-size is per process.
# Preemption and time limits: SLURM signals the job two minutes before the end (--signal); the signal is
# forwarded as SIGTERM to srun -> torchrun -> every process, which checkpoint at the next step and exit cleanly; the job then
# requeues itself and continues with --resume. Outputs go to $OUTDIR.
#SBATCH --job-name=mnist-text-cfg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:2
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -f "${VENV_DIR:-.venv}/bin/activate" ]; then source "${VENV_DIR:-.venv}/bin/activate"; fi  # else the python on PATH

GPUS_PER_NODE=${GPUS_PER_NODE:-2}
NODES=${SLURM_JOB_NUM_NODES:-1}
EPOCHS=${EPOCHS:-20}
OUTDIR=${OUTDIR:-runs/text-cfg-ddp}
TEXT_ENCODER=${TEXT_ENCODER:-minilm}
WANDB=${WANDB:-off}
FLAGS=${FLAGS:-}                   # more mnist_text_cfg.py flags
RDZV_PORT=${RDZV_PORT:-29500}
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
    MASTER=localhost
fi
RESUME=""
if ls "$OUTDIR"/checkpoints/ckpt-*.pt >/dev/null 2>&1; then RESUME="--resume"; fi

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPUs')"
echo "nodes $NODES x $GPUS_PER_NODE processes, rendezvous at $MASTER:$RDZV_PORT"

LAUNCH=(torchrun --nnodes "$NODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER:$RDZV_PORT" --rdzv_id "${SLURM_JOB_ID:-local}"
        mnist_text_cfg.py --outdir "$OUTDIR" --epochs "$EPOCHS" --max-minutes 0 --text-encoder "$TEXT_ENCODER"
        --wandb "$WANDB" --no-progress $RESUME $FLAGS)
if [ -n "${SLURM_JOB_ID:-}" ]; then
    LAUNCH=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${LAUNCH[@]}")
fi

stopped=0
child=0
forward_signal() { stopped=1; [ "$child" -ne 0 ] && kill -TERM "$child" 2>/dev/null || true; }  # torchrun passes TERM on
trap forward_signal USR1 TERM

"${LAUNCH[@]}" &
child=$!
status=0
wait "$child" || status=$?
if [ "$stopped" -eq 1 ]; then   # `wait` returned early for the trapped signal: wait for the checkpoint
    status=0
    wait "$child" || status=$?
    echo "stopped by a signal; requeueing job ${SLURM_JOB_ID:-?}"
    [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit $status
