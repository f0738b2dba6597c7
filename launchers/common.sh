# Shared by the ds-cl launchers; sourced, not run.
#
# Environment:
#   PYTHON        interpreter with ds_cl and deepspeed installed (default: python3)
#   DS_CL_ENTRY   a Python script to run on every rank instead of `ds-cl train` (tests, debugging);
#                 it gets the same arguments: CONFIG [key.sub=value ...] [--resume | --resume-or-start]
PYTHON=${PYTHON:-python3}

die() { echo "ds-cl launch: error: $*" >&2; exit 2; }

# PYTHON must import ds_cl and deepspeed. Without this check the first "$PYTHON -m ds_cl..." fails with
# "No module named ds_cl", which does not say that PYTHON picks the interpreter (python3 is rarely the
# venv's). The hint: the interpreter of the `ds-cl` command on PATH, else this checkout's .venv.
check_python() {
    local missing hint=/path/to/venv/bin/python root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if command -v ds-cl >/dev/null 2>&1 && [[ $(head -c 2 "$(command -v ds-cl)") == '#!' ]]; then
        hint=$(head -n 1 "$(command -v ds-cl)"); hint=${hint#\#!}
    elif [[ -x $root/.venv/bin/python ]]; then hint=$root/.venv/bin/python
    fi
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "PYTHON=$PYTHON: no such interpreter; set PYTHON to the Python ds-cl is installed in, e.g. PYTHON=$hint"
    missing=$("$PYTHON" -c 'import importlib.util as u
print(" and ".join(m for m in ("ds_cl", "deepspeed") if u.find_spec(m) is None))' 2>/dev/null) || missing="ds_cl"
    [[ -z $missing ]] ||
        die "PYTHON=$PYTHON ($(command -v "$PYTHON")) cannot import $missing; set PYTHON to the Python ds-cl is installed in, e.g. PYTHON=$hint"
}

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

# Check "CONFIG [overrides...] [--resume | --resume-or-start]" and keep it: CONFIG, PASS (all, in order).
set_run_args() {
    [[ $# -ge 1 ]] || die "missing run config: usage: $USAGE"
    CONFIG=$1; shift
    [[ $CONFIG != -* ]] || die "expected the run config, got option $CONFIG: usage: $USAGE"
    [[ -f $CONFIG ]] || die "run config $CONFIG does not exist"
    PASS=("$CONFIG" "$@")
    local a
    for a in "$@"; do
        case $a in
            --resume|--resume-or-start|*=*) ;;
            *) die "unexpected argument '$a' after the run config (overrides look like key.sub=value; flags: --resume, --resume-or-start)" ;;
        esac
    done
}

# The GPUs CUDA_VISIBLE_DEVICES gives the job (ds_cl.tools.launch_checks gpu_include); given --num_gpus
# instead, DeepSpeed's runner drops the variable and takes GPUs 0..N-1, another job's on a shared node.
# With the variable set: GPUS (their number), RESOURCES=(--include HOST:IDS[@HOST:IDS...]) and, without a
# hostfile (one node), UNSET_VISIBLE (see single_node.sh). Without it: RESOURCES=() and GPUS unchanged.
# $1: the count the user asked for (may be empty; must agree); $2, $3: hostfile and nodes.
set_gpus() {
    local found args=()
    [[ -z ${1:-} ]] || args+=(--gpus "$1")
    [[ -z ${2:-} ]] || args+=(--hostfile "$2" --nodes "$3")
    found=$("$PYTHON" -m ds_cl.tools.launch_checks gpus "${args[@]}") || exit 2
    RESOURCES=() UNSET_VISIBLE=()
    [[ -n $found ]] || return 0
    GPUS=${found%% *}
    RESOURCES=(--include "${found#* }")
    [[ -n ${2:-} ]] || UNSET_VISIBLE=(env -u CUDA_VISIBLE_DEVICES)
}

# Print a command as one shell-quoted line.
show() { local q; printf -v q '%q ' "$@"; echo "${q% }"; }

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1
    else echo 1; fi
}

# `ds-cl train CONFIG [overrides] [--resume...] --check` at the launch's world size ($@: --world-size N, or
# --nodes N --gpus-per-node G): the run's plan (batch arithmetic, steps, lengths, model, checkpoint size,
# disk; ds_cl/training/check.py) on stderr, so that stdout stays the --dry-run command. A failed check
# stops the launch before deepspeed starts.
run_check() {
    "$PYTHON" -m ds_cl.cli train "${PASS[@]}" --check "$@" >&2 ||
        die "ds-cl train --check failed (the lines above); nothing was launched"
}

# What single_node.sh and multi_node.sh run before deepspeed, in one process (one interpreter and torch start-up):
# `python -m ds_cl.tools.launch_checks check`, the preflight (its `preflight ok: ...` line, or one line
# `ds-cl launch: error: ...`) and then run_check's `ds-cl train CONFIG ... --check` at the same world size, its plan
# on stderr too ($@: --world-size N, or --nodes N --gpus-per-node G [--hostfile H]). Either failing stops the
# launch with exit status 2 (a failed plan after the line run_check ends with).
run_preflight_and_check() {
    "$PYTHON" -m ds_cl.tools.launch_checks check "$@" -- "${PASS[@]}" >&2
}
