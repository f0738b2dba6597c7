#!/usr/bin/env bash
# One machine, one process per GPU:
#   launchers/single_node.sh [--gpus N] [--port P] [--entry SCRIPT] [--dry-run] CONFIG [key.sub=value ...] [--resume | --resume-or-start]
# runs `deepspeed --num_gpus N --module ds_cl.cli train CONFIG ...` after the preflight checks and
# `ds-cl train CONFIG ... --check --world-size N` (the run's plan, on stderr; a failed check stops here),
# both in one process (`python -m ds_cl.tools.launch_checks check`). --dry-run prints the command instead
# of running it.
# With CUDA_VISIBLE_DEVICES set (a node shared with other jobs) the ranks run on those GPUs:
# `deepspeed --include localhost:IDS`, N = their number (--gpus, if given, must agree).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
USAGE="single_node.sh [--gpus N] [--port P] [--entry SCRIPT] [--dry-run] CONFIG [key.sub=value ...] [--resume | --resume-or-start]"
source "$HERE/common.sh"

GPUS=${NUM_GPUS:-} PORT=${MASTER_PORT:-29500} DRY_RUN=0 ENTRY=
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) GPUS=${2:?--gpus needs a number}; shift 2 ;;
        --port) PORT=${2:?--port needs a number}; shift 2 ;;
        --entry) ENTRY=${2:?--entry needs a script}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) echo "usage: $USAGE"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1: usage: $USAGE" ;;
        *) break ;;
    esac
done
set_run_args "$@"
set_program "$ENTRY"
check_python
set_gpus "$GPUS"
[[ -n $GPUS ]] || GPUS=$(gpu_count)
[[ ${#RESOURCES[@]} -gt 0 ]] || RESOURCES=(--num_gpus "$GPUS")

run_preflight_and_check --world-size "$GPUS"

# Under --include the runner must not see CUDA_VISIBLE_DEVICES: it would count only the visible GPUs and
# refuse the indices past that count (its launcher gives each rank CUDA_VISIBLE_DEVICES=IDS itself).
CMD=("${UNSET_VISIBLE[@]}" "$PYTHON" -m deepspeed.launcher.runner "${RESOURCES[@]}" --master_port "$PORT"
     "${PROGRAM[@]}" "${PASS[@]}")
if (( DRY_RUN )); then
    echo "[localhost] $(show "${CMD[@]}")"
    exit 0
fi
# Ctrl-C reaches every process of the terminal's group: the ranks checkpoint and exit (docs/reliability.md);
# deepspeed's single-node runner has no handler and would print a KeyboardInterrupt traceback while it
# waits for them. Ignored here, it is inherited ignored by the runner only (its launcher and the ranks
# install their own handlers; the multi-node pdsh runner installs one too).
trap '' INT
exec "${CMD[@]}"
