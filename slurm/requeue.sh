# Sourced by the sbatch scripts (after they cd to the repository root): SLURM's pre-timeout USR1 (or a
# TERM at preemption) is forwarded to the running Python step as USR1, which checkpoints and exits
# cleanly; then the job requeues itself, and the next run continues with --resume.
stopped=0
child=0
forward_signal() { stopped=1; [ "$child" -ne 0 ] && kill -USR1 "$child" 2>/dev/null || true; }
trap forward_signal USR1 TERM

run_step() {  # run a Python step in the background so this shell can forward the signal to it
    "$@" &
    child=$!
    local status=0
    wait "$child" || status=$?
    if [ "$stopped" -eq 1 ]; then   # `wait` returned early for the trapped signal: wait for the checkpoint
        status=0
        wait "$child" || status=$?
    fi
    child=0
    if [ "$stopped" -eq 1 ]; then
        echo "stopped by a signal; requeueing job ${SLURM_JOB_ID:-?}"
        [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return $status
}
