#!/usr/bin/env bash
# Check a run for the allocation it asks for, then submit it:
#
#   launchers/slurm/submit.sh [--nodes N] [--gpus-per-node G] [--dry-run] [other sbatch flags] \
#       CONFIG [key.sub=value ...] [--resume | --resume-or-start]
#
# runs `ds-cl train CONFIG ... --check --nodes N --gpus-per-node G` here (the login node: no GPU, no
# DeepSpeed; docs/launching.md) and only when it passes `sbatch --nodes=N --gpus-per-node=G [flags]
# launchers/slurm/llama2_7b.sbatch CONFIG ...`. N and G default to the sbatch script's own #SBATCH lines.
# The job still runs its preflight (ds_cl.tools.launch_checks) in the allocation: the last guard.
# Other sbatch flags go before CONFIG, as --flag=value (or a bare --flag such as --exclusive), so that a
# flag's value is never taken for the config: --time=2:00:00 --partition=gpu --account=proj.
# --dry-run: run the check, print the sbatch command, submit nothing. PYTHON as for the other launchers;
# sbatch passes the environment (PYTHON included) on to the job.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=$HERE/llama2_7b.sbatch
USAGE="submit.sh [--nodes N] [--gpus-per-node G] [--dry-run] [--sbatch-flag=value ...] CONFIG [key.sub=value ...] [--resume | --resume-or-start]"
source "$HERE/../common.sh"

# The script's defaults: its `#SBATCH --nodes=` and `#SBATCH --gpus-per-node=` lines.
sbatch_default() { sed -n "s/^#SBATCH --$1=\([0-9][0-9]*\)\s*$/\1/p" "$SCRIPT" | head -n 1; }
NODES=$(sbatch_default nodes) GPUS=$(sbatch_default gpus-per-node) DRY_RUN=0 FLAGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes|-N) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --gpus-per-node) GPUS=${2:?--gpus-per-node needs a number}; shift 2 ;;
        --gpus-per-node=*) GPUS=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) echo "usage: $USAGE"; exit 0 ;;
        --) shift; break ;;
        -*) FLAGS+=("$1"); shift ;;
        *) break ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
set_run_args "$@"
check_python

echo "ds-cl submit: checking $CONFIG for $NODES node(s) x $GPUS GPU(s) = world $((NODES * GPUS))" >&2
run_check --nodes "$NODES" --gpus-per-node "$GPUS"

CMD=(sbatch "--nodes=$NODES" "--gpus-per-node=$GPUS" "${FLAGS[@]}" "$SCRIPT" "${PASS[@]}")
if (( DRY_RUN )); then
    show "${CMD[@]}"
    exit 0
fi
command -v sbatch >/dev/null 2>&1 || die "sbatch is not on PATH (submit from a SLURM login node); the check passed"
exec "${CMD[@]}"
