#!/usr/bin/env bash
# One GPU for a fixed number of minutes: train an MLLM config through its stages, then evaluate it.
# Made for short loans of a machine (a Colab runtime, a spot GPU, a lent device): each phase runs
# under a wall-clock box, `train` saves a checkpoint on the box's SIGTERM, and `eval` scores the
# latest checkpoint whether training finished or not, so the box always ends with held-out scores.
#
#   bash launch/gpu_box.sh --workdir=DIR [--config=configs/illume_tiny.py:ARGS] [--train_s=480] [--eval_s=240]
#        [--tokenizer_s=0] [--tokenizer_config=configs/dualvitok.py:ARGS] [--python=python3]
#        [-- extra eval flags, e.g. --gen_scenes=16]
#
# Default config: the 32x32-tokenizer ShapeComp MLLM of the README's H200 section, with the scene_text
# stage first (text_steps=1500: what first made POPE move on CPU) (--config names
# the tokenizer workdir: tokenizer=DIR). --tokenizer_s=N first trains that tokenizer from scratch
# (32x32 pixel grid, the 2x wider pixel decoder, cosine LR) in <workdir>/tokenizer for at most N s,
# and the MLLM uses it: for a machine that starts with nothing but the code. Writes
# <workdir>/box.log (phase stamps), tokenizer.log, train.log, eval.log and, last, <workdir>/BOX_DONE;
# prints the headline scores. Uses the given python as it is (no venv): on a machine with the stack
# installed, or with PYTHONPATH pointing at it.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,18p' "$0"; exit 2; }
source launch/lib.sh   # die

config="configs/illume_tiny.py:steps=1600,batch=32,size=medium,pixel_grid=32,examples=3000,device=gpu,lr_scale=0.5,workers=8,text_steps=1500"
workdir="" train_s=480 eval_s=240 tokenizer_s=0 python=python3
tokenizer_config="configs/dualvitok.py:size=tiny,pixel_grid=32,steps=1800,workers=8"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --train_s=*) train_s="${1#*=}" ;;
    --eval_s=*) eval_s="${1#*=}" ;;
    --tokenizer_s=*) tokenizer_s="${1#*=}" ;;
    --tokenizer_config=*) tokenizer_config="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (see: bash launch/gpu_box.sh --help)" ;;
  esac
  shift
done
[ -n "$workdir" ] || die "--workdir=DIR is required"
for v in train_s eval_s; do [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v: expected a positive number of seconds, got '${!v}'"; done
[[ "$tokenizer_s" =~ ^[0-9]+$ ]] || die "--tokenizer_s: expected a number of seconds (0: no tokenizer phase), got '$tokenizer_s'"
command -v "$python" >/dev/null 2>&1 || die "--python=$python: not found"
mkdir -p "$workdir" || die "--workdir=$workdir: cannot create it"
rm -f "$workdir/BOX_DONE"
export PYTHONUNBUFFERED=1

t0=$(date +%s)
stamp() { echo "[box +$(( $(date +%s) - t0 ))s] $*" | tee -a "$workdir/box.log"; }
if [ "$tokenizer_s" -gt 0 ]; then
  # The README's 0.951 tokenizer came from two runs (a 32x32 run, then a wider decoder on its
  # encoder); here it is one run with the wide decoder from the start. Stopped by the box, it
  # saves a checkpoint at the step boundary, and the MLLM takes whatever it reached.
  stamp "tokenizer $tokenizer_config (box ${tokenizer_s} s)"
  timeout -s TERM -k 40 "$tokenizer_s" "$python" -m illume_jax train-tokenizer --config="$tokenizer_config" \
    --workdir="$workdir/tokenizer" --config.model.pixel_decoder.ch=64 --config.train.schedule=cosine \
    --config.checkpoint.every_steps=300 >"$workdir/tokenizer.log" 2>&1
  stamp "tokenizer exit $? (124: the box ended it)"
  grep -E "ceiling|Traceback|Error" "$workdir/tokenizer.log" | tail -4
  config="$config,tokenizer=$workdir/tokenizer"
fi
stamp "train $config (box ${train_s} s)"
# -k: a second signal 40 s later, for a step or compile that outlasts the first (the trainer exits
# at once on a second SIGTERM; the checkpoint of the previous boundary stays).
timeout -s TERM -k 40 "$train_s" "$python" -m illume_jax train --config="$config" --workdir="$workdir" \
  --config.checkpoint.every_steps=400 >"$workdir/train.log" 2>&1
stamp "train exit $? (124: the box ended it)"
grep -E "^stage|training done|Traceback|Error" "$workdir/train.log" | tail -8
stamp "eval (box ${eval_s} s)"
timeout -s TERM -k 20 "$eval_s" "$python" -m illume_jax eval --workdir="$workdir" "${extra[@]}" >"$workdir/eval.log" 2>&1
stamp "eval exit $?"
# eval prints "eval: <suite> done after N s: <headline>" after each suite (and keeps the finished
# suites in eval/level1_test/metrics.partial.json when stopped): its last such line is the result.
done_line=$(grep "^eval: .* done after" "$workdir/eval.log" | tail -1)
if [ -n "$done_line" ]; then echo "$done_line" | tee -a "$workdir/box.log"; else tail -5 "$workdir/eval.log"; fi
touch "$workdir/BOX_DONE"
