#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per node driving all its GPUs, joined by
# jax.distributed (the coordinator is the job's first node).
#
#   bash launch/gpu_cluster.sh --nodes=N --config=configs/illume_plus_7b.py --workdir=/shared/runs/NAME \
#        [--gpus_per_node=8] [--partition=P] [--account=A] [--time=48:00:00] [--port=12345] \
#        [--command=train] [--dry-run] [-- extra illume_jax flags]
#
# Writes the batch script to <workdir>/slurm/<job>.sbatch and submits it with sbatch; --dry-run
# prints the script and the sbatch command instead. The checkout and its .venv (bash
# launch/local.sh ... once on a login node) and the workdir must be on a filesystem every node sees;
# the compilation cache goes to <workdir>/jax_cache. Re-submitting the same command resumes from the
# workdir's latest checkpoint (SLURM's SIGTERM before a time limit or preemption makes it save).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0"; exit 2; }
source launch/lib.sh   # die, do_cmd

nodes="" gpus_per_node=8 partition="" account="" time_limit="48:00:00" port=12345 command="train"
config="" workdir="" dry_run=0 job="illume_jax"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --command=*) command="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --job=*) job="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (see: bash launch/gpu_cluster.sh --help)" ;;
  esac
  shift
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes=N is required (a positive integer), got '${nodes}'"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node: expected a positive integer, got '$gpus_per_node'"
[ -n "$config" ] || die "--config=configs/NAME.py[:args] is required"
[ -n "$workdir" ] || die "--workdir=DIR is required (on a filesystem every node sees)"
case "$workdir" in /*) ;; *) workdir="$PWD/$workdir" ;; esac

q() { printf '%q' "$1"; }
flags="--config=$(q "$config") --workdir=$(q "$workdir")"
if [ ${#extra[@]} -gt 0 ]; then flags+=" $(printf '%q ' "${extra[@]}" | sed 's/ $//')"; fi

script="#!/bin/bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --exclusive
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@300
#SBATCH --output=$workdir/slurm/%x-%j.out
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}set -euo pipefail
cd $(q "$PWD")
# One process per node; process 0 (the first node) is the coordinator.
head_node=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)  # (head would SIGPIPE under pipefail)
export JAX_COORDINATOR_ADDRESS=\"\$head_node:$port\"
export JAX_PROCESS_COUNT=\"\$SLURM_NNODES\"
export JAX_COMPILATION_CACHE_DIR=$(q "$workdir/jax_cache")
export PYTHONPATH=\"\$PWD\${PYTHONPATH:+:\$PYTHONPATH}\"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
srun --kill-on-bad-exit=1 bash -c 'JAX_PROCESS_ID=\$SLURM_PROCID exec .venv/bin/python -m illume_jax $command $flags'
"

if [ "$dry_run" = 1 ]; then
  printf '%s' "$script"
  echo "sbatch $(q "$workdir/slurm/$job.sbatch")"
  exit 0
fi
[ -x .venv/bin/python ] || die "no .venv here: run 'bash launch/local.sh train --help' once on the login node first"
mkdir -p "$workdir/slurm"
printf '%s' "$script" > "$workdir/slurm/$job.sbatch"
sbatch "$workdir/slurm/$job.sbatch"
