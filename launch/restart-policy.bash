# The restart policy of --max-restarts and the multi-node group default, sourced by launch/train,
# launch/slurm.sbatch and launch/multinode-example.

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

# node_groups ARGS…: sets `group` to `--sync-group-size node` (statistics synced within each
# machine) when ARGS give no --sync-group-size and their normalization takes one: the norms whose
# statistics span ranks (syncbn, the default, cbn, brn, rbn, wn-meanonly, ibn; mabn on request) and
# bn with --shuffle-bn. Per-rank and batch-free norms (bn, gn, in, ln, wn) get no group.
node_groups() {
    local norm=syncbn shuffle=0
    group=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --sync-group-size|--sync-group-size=*) return 0 ;;
            --norm) norm="${2:-}"; shift ;;
            --norm=*) norm="${1#--norm=}" ;;
            --shuffle-bn) shuffle=1 ;;
        esac
        shift
    done
    case "$norm" in
        syncbn|cbn|brn|rbn|wn-meanonly|ibn|mabn) group=(--sync-group-size node) ;;
        bn) [ "$shuffle" = 1 ] && group=(--sync-group-size node) ;;
    esac
    return 0
}
