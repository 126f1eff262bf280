#!/usr/bin/env bash
# Set-up and entry point on a fresh machine (CPU is enough for the defaults).
#
#   bash launch/local.sh demo            # the whole ILLUME pipeline on ShapeComp at tiny scale -> runs/demo/report.html
#   bash launch/local.sh pipeline --config=configs/ablation_*.py:ARGS,root=DIR --workdir=DIR   (an ablation arm)
#   bash launch/local.sh test [ARGS]     # the whole test suite (ARGS go to pytest)
#   bash launch/local.sh train|data|aot|train-tokenizer|eval-tokenizer|encode-dataset|train-decoder --config=... [--workdir=...]
#   bash launch/local.sh generate|understand|edit|eval|self-enhance --workdir=... [...]  (a trained MLLM)
#   bash launch/local.sh eval-decoder --workdir=... [--num=N]  (a trained diffusion decoder)
#   bash launch/local.sh convert --from=official|--to=official --kind=... --src=... --dst=...
#
# Creates .venv with Python 3.11 if missing and installs the package with the extras the
# command needs; re-installs only when setup.py changes.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd="${1:-}"
[ -n "$cmd" ] || { sed -n '2,13p' "$0"; exit 2; }
shift

PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; illume_jax needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

case "$cmd" in
  test) extras="test,tpu" ;;   # tpu: libtpu, for the ahead-of-time TPU compile tests
  aot) extras="tpu" ;;
  *) extras="" ;;
esac
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing illume_jax${extras:+[$extras]} into .venv ..."
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# libtpu (installed for AOT compiles) probes for a TPU at start-up and prints errors when there
# is none; on a machine with neither TPU nor NVIDIA GPU, go straight to the CPU.
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 \
   && ! command -v nvidia-smi >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
# A persistent compilation cache makes re-runs start fast.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.venv/jax_cache}"

case "$cmd" in
  demo)
    # DEMO_SCALE=quick (<= 15 min on 2 CPU cores) | full (hours) | smoke; WORKDIR=runs/demo by default.
    workdir="${WORKDIR:-runs/demo}"
    exec .venv/bin/python -m illume_jax pipeline --config="configs/demo.py:scale=${DEMO_SCALE:-quick},root=$workdir" \
      --workdir="$workdir" "$@" ;;
  test)
    # libtpu is installed for AOT tests; keep the default backend on the CPU.
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    # Two workers (the CI has 2 cores; one process leaves one idle while XLA compiles), a test
    # module per worker at a time (tests/conftest.py orders them); TEST_WORKERS=0 runs in-process.
    workers="${TEST_WORKERS:-2}"
    xdist=()
    [ "$workers" != "0" ] && xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
    exec .venv/bin/python -m pytest -q "${xdist[@]}" "${@:-tests}" ;;
  pipeline|summarize|train|data|aot|train-tokenizer|eval-tokenizer|encode-dataset|train-decoder|eval-decoder|generate|understand|edit|eval|\
  self-enhance|convert)
    exec .venv/bin/python -m illume_jax "$cmd" "$@" ;;
  *)
    echo "error: unknown command '$cmd' (expected demo, test, pipeline, summarize, train, data, aot, train-tokenizer, eval-tokenizer, encode-dataset," \
         "train-decoder, eval-decoder, generate, understand, edit, eval, self-enhance or convert)" >&2; exit 2 ;;
esac
