#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod) with the same code as locally.
#
#   bash launch/tpu_pod.sh ACTION --name=NAME --zone=ZONE [options] [-- extra illume_jax flags]
#
# ACTION   create   make the slice (gcloud compute tpus tpu-vm create)
#          copy     ship this checkout (git archive of HEAD: commit first) to every worker and install it
#                   there (Python 3.11 venv via uv, the package with the [tpu] extra)
#          run      start `python -m illume_jax COMMAND` on every worker (--worker=all) in the
#                   background; multi-host JAX initialises itself (JAX_DISTRIBUTED_AUTO=1), the
#                   compilation cache and the checkpoints live on the bucket
#          tail     follow worker 0's log
#          stop     kill the job on every worker (a SIGTERM: the loop saves a checkpoint first)
#          delete   delete the slice
#          up       create + copy + run
# Options  --accelerator=v5p-128  --version=v2-alpha-tpuv5 (the TPU VM image)  --project=P  --spot
#          --bucket=gs://B (run: required; cache gs://B/jax_cache, checkpoints gs://B/NAME/checkpoints)
#          --command=train  --config=configs/illume_plus_7b.py  --workdir=runs/NAME (local on each worker:
#          metrics, data, text tokenizer)
#          --dry-run   print every command instead of running it
#
# Re-running `run` after a preemption resumes from the bucket's latest checkpoint (same command).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,23p' "$0"; exit 2; }
source launch/lib.sh   # die, do_cmd

action="${1:-}"
[ -n "$action" ] || usage
shift
name="" zone="" project="" accelerator="v5p-128" version="v2-alpha-tpuv5" bucket="" spot=0 dry_run=0
command="train" config="configs/illume_plus_7b.py" workdir=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --command=*) command="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (see: bash launch/tpu_pod.sh --help)" ;;
  esac
  shift
done
case "$action" in
  create|copy|run|tail|stop|delete|up) ;;
  *) die "unknown action '$action' (expected create, copy, run, tail, stop, delete or up)" ;;
esac
[ -n "$name" ] || die "--name=NAME is required (the TPU VM's name)"
[ -n "$zone" ] || die "--zone=ZONE is required (e.g. us-east5-a)"
workdir="${workdir:-runs/$name}"
bucket="${bucket%/}"


tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")
on_workers() {  # on_workers WORKER 'remote shell command'
  do_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

create() {
  local args=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")
  [ "$spot" = 1 ] && args+=(--spot)
  do_cmd "${args[@]}"
}

copy() {
  local archive="/tmp/illume_jax-$name.tar.gz"
  do_cmd git archive --format=tar.gz -o "$archive" HEAD
  do_cmd "${tpu[@]}" scp "$archive" "$name:illume_jax.tar.gz" "${where[@]}" --worker=all
  # TPU VM images ship an older Python; uv brings 3.11 (the package pins it) without root.
  on_workers all "set -e; rm -rf ~/illume_jax && mkdir -p ~/illume_jax && tar xzf ~/illume_jax.tar.gz -C ~/illume_jax \
&& cd ~/illume_jax && (command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) \
&& ~/.local/bin/uv venv --python 3.11 .venv && ~/.local/bin/uv pip install --python .venv/bin/python -e '.[tpu]'"
}

run() {
  [ -n "$bucket" ] || die "run needs --bucket=gs://BUCKET (every host writes its checkpoint shards there)"
  case "$bucket" in gs://*) ;; *) die "--bucket=$bucket: expected a gs:// URL" ;; esac
  local flags
  flags="--config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")"
  [ "$command" = train ] && flags+=" --config.checkpoint.directory=$bucket/$name/checkpoints"
  if [ ${#extra[@]} -gt 0 ]; then flags+=" $(printf '%q ' "${extra[@]}" | sed 's/ $//')"; fi
  on_workers all "cd ~/illume_jax && JAX_DISTRIBUTED_AUTO=1 JAX_COMPILATION_CACHE_DIR=$bucket/jax_cache \
PYTHONPATH=\$PWD nohup .venv/bin/python -m illume_jax $command $flags > ~/illume_jax_$name.log 2>&1 &"
}

case "$action" in
  create) create ;;
  copy) copy ;;
  run) run ;;
  tail) on_workers 0 "tail -n 200 -F ~/illume_jax_$name.log" ;;
  stop) on_workers all "pkill -TERM -f 'illume_jax $command' || true" ;;
  delete) do_cmd "${tpu[@]}" delete "$name" "${where[@]}" --quiet ;;
  up) create; copy; run ;;
esac
