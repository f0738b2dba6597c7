# Shared by the ds-cl launchers; sourced, not run.
#
# Environment:
#   PYTHON        interpreter with ds_cl and deepspeed installed (default: python3)
#   DS_CL_ENTRY   a Python script to run on every rank instead of `ds-cl train` (tests, debugging);
#                 it gets the same arguments: CONFIG [key.sub=value ...] [--resume]
PYTHON=${PYTHON:-python3}

die() { echo "ds-cl launch: error: $*" >&2; exit 2; }

# PROGRAM: what deepspeed starts on each rank, before CONFIG and the overrides.
# --no_local_rank: ranks read LOCAL_RANK from the environment, argv stays CONFIG + overrides.
set_program() {
    local entry=${1:-${DS_CL_ENTRY:-}}
    if [[ -n $entry ]]; then
        [[ -f $entry ]] || die "entry script $entry does not exist"
        PROGRAM=(--no_local_rank "$entry")
    else
        PROGRAM=(--no_local_rank --module ds_cl.cli train)
    fi
}

# Split "CONFIG [overrides...] [--resume]" into CONFIG, PASS (all, in order) and OVERRIDES (key=value only).
set_run_args() {
    [[ $# -ge 1 ]] || die "missing run config: usage: $USAGE"
    CONFIG=$1; shift
    [[ $CONFIG != -* ]] || die "expected the run config, got option $CONFIG: usage: $USAGE"
    [[ -f $CONFIG ]] || die "run config $CONFIG does not exist"
    PASS=("$CONFIG" "$@")
    OVERRIDES=()
    local a
    for a in "$@"; do
        case $a in
            --resume) ;;
            *=*) OVERRIDES+=("$a") ;;
            *) die "unexpected argument '$a' after the run config (overrides look like key.sub=value; flag: --resume)" ;;
        esac
    done
}

# Print a command as one shell-quoted line.
show() { local q; printf -v q '%q ' "$@"; echo "${q% }"; }

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1
    else echo 1; fi
}
