# The restart policy of --max-restarts, sourced by launch/train and launch/slurm.sbatch.

# retryable STATUS: whether a job that ended with STATUS is worth starting again. Not success
# (0), a usage error (64) or a configuration error (2), which a restart would repeat, and not an
# interruption (130, 143: the user or the scheduler stopped it).
retryable() {
    case "$1" in 0|2|64|130|143) return 1 ;; *) return 0 ;; esac
}

# resuming ARGS…: sets `resumed` to ARGS with --resume pointing at the run's own checkpoint
# (`--resume auto`: --save's file when it exists, else a fresh start), replacing any other
# --resume, so a restart continues where the last checkpoint left the run.
resuming() {
    resumed=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --resume) shift 2 || shift ;;
            --resume=*) shift ;;
            *) resumed+=("$1"); shift ;;
        esac
    done
    resumed+=(--resume auto)
}

# saves ARGS…: whether ARGS name --save (a restart has a checkpoint to continue from).
saves() {
    local arg
    for arg in "$@"; do case "$arg" in --save|--save=?*) return 0 ;; esac; done
    return 1
}
