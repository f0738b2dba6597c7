#!/usr/bin/env bash
# Several machines listed in a DeepSpeed hostfile (`hostname slots=GPUS`, one line per node).
#
# ssh mode (default), run once on the first node; deepspeed starts the other nodes with pdsh:
#   launchers/multi_node.sh --hostfile H [--nodes N] [--gpus-per-node G] CONFIG [key.sub=value ...] [--resume | --resume-or-start]
# per-node mode, run once on every node (what srun does; no ssh needed):
#   launchers/multi_node.sh --no-ssh --node-rank I --hostfile H [--nodes N] ... CONFIG [...]
#
# Options: --master-addr A (default: first host of the hostfile), --master-port P (default 29500),
# --launcher pdsh|openmpi|mvapich|impi (ssh mode), --entry SCRIPT, --dry-run.
# --dry-run prints the command of every node (in --no-ssh mode without --node-rank: all of them).
# Before deepspeed starts: the preflight checks and `ds-cl train CONFIG ... --check` at world nodes x GPUs
# per node, in one process (`python -m ds_cl.tools.launch_checks check`; the run's plan on stderr; a failed
# check stops here).
# With CUDA_VISIBLE_DEVICES set (nodes shared with other jobs) the ranks run on those GPU indices, given to
# deepspeed as --include HOST:IDS@...: in --no-ssh mode each node's own variable; in ssh mode the first
# node's, on every node (the hostfile says how many GPUs a node has, not which). --gpus-per-node, if
# given, must be their number, and slots= each node's GPU count.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
USAGE="multi_node.sh --hostfile H [--no-ssh --node-rank I] [--nodes N] [--gpus-per-node G] [--master-addr A] [--master-port P] [--entry SCRIPT] [--dry-run] CONFIG [key.sub=value ...] [--resume | --resume-or-start]"
source "$HERE/common.sh"

HOSTFILE= NODES= GPUS= ADDR= PORT=${MASTER_PORT:-29500} NO_SSH=0 NODE_RANK= LAUNCHER=pdsh DRY_RUN=0 ENTRY=
while [[ $# -gt 0 ]]; do
    case $1 in
        --hostfile) HOSTFILE=${2:?--hostfile needs a file}; shift 2 ;;
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --gpus-per-node) GPUS=${2:?--gpus-per-node needs a number}; shift 2 ;;
        --master-addr) ADDR=${2:?--master-addr needs a host}; shift 2 ;;
        --master-port) PORT=${2:?--master-port needs a number}; shift 2 ;;
        --no-ssh) NO_SSH=1; shift ;;
        --node-rank) NODE_RANK=${2:?--node-rank needs a number}; shift 2 ;;
        --launcher) LAUNCHER=${2:?--launcher needs a name}; shift 2 ;;
        --entry) ENTRY=${2:?--entry needs a script}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) echo "usage: $USAGE"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1: usage: $USAGE" ;;
        *) break ;;
    esac
done
[[ -n $HOSTFILE ]] || die "--hostfile is required: usage: $USAGE"
set_run_args "$@"
set_program "$ENTRY"
check_python

# Hostfile checks (exists, well formed, no duplicates) come first: the defaults below read it.
"$PYTHON" -m ds_cl.tools.launch_checks master --hostfile "$HOSTFILE" >/dev/null
mapfile -t HOSTS < <(grep -v '^\s*\(#\|$\)' "$HOSTFILE" | awk '{print $1}')
mapfile -t SLOTS < <(grep -v '^\s*\(#\|$\)' "$HOSTFILE" | awk '{sub("slots=", "", $2); print $2}')
[[ -n $NODES ]] || NODES=${#HOSTS[@]}
set_gpus "$GPUS" "$HOSTFILE" "$NODES"
[[ -n $GPUS ]] || GPUS=${SLOTS[0]}
[[ ${#RESOURCES[@]} -gt 0 ]] || RESOURCES=(--num_nodes "$NODES" --num_gpus "$GPUS")
[[ -n $ADDR ]] || ADDR=${HOSTS[0]}
if [[ -n $NODE_RANK ]]; then
    (( NO_SSH )) || die "--node-rank is for --no-ssh mode"
    [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) || die "--node-rank $NODE_RANK must be in 0..$((NODES - 1))"
fi
(( NO_SSH && ! DRY_RUN )) && [[ -z $NODE_RANK ]] && die "--no-ssh needs --node-rank (this node's index in the hostfile)"

run_preflight_and_check --nodes "$NODES" --gpus-per-node "$GPUS" --hostfile "$HOSTFILE"

BASE=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${RESOURCES[@]}"
      --master_addr "$ADDR" --master_port "$PORT")
if (( NO_SSH )); then
    if (( DRY_RUN )); then
        ranks=${NODE_RANK:-$(seq -s ' ' 0 $((NODES - 1)))}
        for r in $ranks; do
            echo "[${HOSTS[$r]}] $(show "${BASE[@]}" --no_ssh --node_rank "$r" "${PROGRAM[@]}" "${PASS[@]}")"
        done
        exit 0
    fi
    exec "${BASE[@]}" --no_ssh --node_rank "$NODE_RANK" "${PROGRAM[@]}" "${PASS[@]}"
fi
CMD=("${BASE[@]}" --launcher "$LAUNCHER" "${PROGRAM[@]}" "${PASS[@]}")
if (( DRY_RUN )); then
    echo "[${HOSTS[0]}] $(show "${CMD[@]}")"
    for ((r = 0; r < NODES; r++)); do
        echo "[${HOSTS[$r]}] (started by $LAUNCHER) $PYTHON -u -m deepspeed.launcher.launch --node_rank=$r --master_addr=$ADDR --master_port=$PORT ... $(show "${PROGRAM[@]:1}" "${PASS[@]}")"
    done
    exit 0
fi
# Ctrl-C reaches every process of the terminal's group: the ranks checkpoint and exit (docs/reliability.md);
# deepspeed's single-node runner has no handler and would print a KeyboardInterrupt traceback while it
# waits for them. Ignored here, it is inherited ignored by the runner only (its launcher and the ranks
# install their own handlers; the multi-node pdsh runner installs one too).
trap '' INT
exec "${CMD[@]}"
