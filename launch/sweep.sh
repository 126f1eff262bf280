#!/usr/bin/env bash
# A grid of config arguments: every combination is one run in its own workdir.
#
#   bash launch/sweep.sh --config=configs/illume_tiny.py[:fixed=args] --grid='steps=200,400 batch=8,16' \
#        [--root=runs/sweep] [--command=train] [--dry-run] [-- extra illume_jax flags]
#   bash launch/sweep.sh ... --pod=NAME --zone=ZONE --bucket=gs://B [--accelerator=v5p-64]
#
# --grid    space-separated KEY=V1,V2,... entries over the config's get_config arguments
#           (configs/*.py document theirs); the runs are the cross product.
# locally   runs `bash launch/local.sh COMMAND --config=CONFIG:ARGS --workdir=ROOT/ARGS` one after
#           the other; each is resumable, so re-running the sweep continues where it stopped and
#           skips finished runs quickly. --command=pipeline (the ablation configs, configs/ablation_*.py)
#           adds root=ROOT/ARGS to the config's arguments, and the sweep ends with
#           `local.sh summarize --workdir=ROOT`: ROOT/summary.md, the runs side by side.
# --pod     prints (or, without --dry-run, runs) one `launch/tpu_pod.sh up` per combination, each on
#           its own slice NAME-<i>, with the workdir and checkpoints named after the combination.
# --dry-run prints the commands and runs none.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,17p' "$0"; exit 2; }
source launch/lib.sh   # die, do_cmd

config="" grid="" root="runs/sweep" command="train" dry_run=0 pod="" zone="" bucket="" accelerator="v5p-64"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --grid=*) grid="${1#*=}" ;;
    --root=*) root="${1#*=}" ;;
    --command=*) command="${1#*=}" ;;
    --pod=*) pod="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (see: bash launch/sweep.sh --help)" ;;
  esac
  shift
done
[ -n "$config" ] || die "--config=configs/NAME.py[:args] is required"
[ -n "$grid" ] || die "--grid='KEY=V1,V2 ...' is required"
if [ -n "$pod" ]; then
  [ -n "$zone" ] || die "--pod needs --zone=ZONE"
  [ -n "$bucket" ] || die "--pod needs --bucket=gs://BUCKET"
fi

# The cross product, as 'k1=v1,k2=v2' strings.
combos=("")
for entry in $grid; do
  [[ "$entry" == *=?* ]] || die "--grid entry '$entry': expected KEY=V1,V2,..."
  key="${entry%%=*}"
  IFS=',' read -r -a values <<< "${entry#*=}"
  next=()
  for c in "${combos[@]}"; do
    for v in "${values[@]}"; do
      [ -n "$v" ] || die "--grid entry '$entry': empty value"
      next+=("${c:+$c,}$key=$v")
    done
  done
  combos=("${next[@]}")
done

file="${config%%:*}"
fixed=""
[[ "$config" == *:* ]] && fixed="${config#*:}"
[ -f "$file" ] || die "--config: no such file '$file'"


runner=(bash launch/local.sh)
[ -n "${ILLUME_SWEEP_RUNNER:-}" ] && runner=("$ILLUME_SWEEP_RUNNER")   # (tests)
i=0
for c in "${combos[@]}"; do
  args="${fixed:+$fixed,}$c"
  name="$(echo "$c" | tr ',=' '_-')"
  workdir="$root/$name"
  [ -n "$pod" ] && workdir="runs/$name"
  [ "$command" = pipeline ] && args="$args,root=$workdir"   # a pipeline's phases find each other there
  if [ -n "$pod" ]; then
    do_cmd bash launch/tpu_pod.sh up --name="$pod-$i" --zone="$zone" --bucket="$bucket" \
      --accelerator="$accelerator" --command="$command" --config="$file:$args" --workdir="$workdir" \
      ${extra[@]+-- "${extra[@]}"}
  else
    do_cmd "${runner[@]}" "$command" --config="$file:$args" --workdir="$workdir" ${extra[@]+"${extra[@]}"}
  fi
  i=$((i + 1))
done
if [ -z "$pod" ] && [ "$command" = pipeline ]; then
  do_cmd "${runner[@]}" summarize --workdir="$root"
fi
echo "sweep: ${#combos[@]} runs" >&2
