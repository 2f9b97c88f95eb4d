#!/usr/bin/env bash
# The main job: prepare AN4, train the Zipformer baseline, the early-exit baseline and the
# Splitformer with CPU presets, decode every exit of each, and write exp/report/.
#
#   ./run.sh [--num-epochs 30] [--avg 5] [--models "zipformer-cpu ee-zipformer-cpu splitformer-cpu"]
#            [--corpus-dir ../shared/data/an4] [--max-duration 100] [--decoding-method greedy_search]
#            [--stage 0] [--stop-stage 3]
#
# Stages: 0 prepare data, 1 train, 2 decode, 3 report. Each model trains into exp/<preset>/.
set -euo pipefail
cd "$(dirname "$0")"

num_epochs=30
avg=5
models="zipformer-cpu ee-zipformer-cpu splitformer-cpu"
corpus_dir=../shared/data/an4
max_duration=100
decoding_method=greedy_search
stage=0
stop_stage=3
# AN4 is 0.6 h: few batches per epoch, so warm-ups, LR decay and the Zipformer's dropout/skip
# schedules are shortened from icefall's LibriSpeech values, and the running average is updated often.
an4_train_args="--warmup-batches 100 --warm-step 300 --lr-batches 1000 --lr-epochs 6 --average-period 4 --schedule-ref-duration 5"
extra_train_args=""

while [ $# -gt 0 ]; do
  case "$1" in
    --num-epochs) num_epochs=$2; shift 2 ;;
    --avg) avg=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --corpus-dir) corpus_dir=$2; shift 2 ;;
    --max-duration) max_duration=$2; shift 2 ;;
    --decoding-method) decoding_method=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --train-args) extra_train_args=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$avg" -le "$num_epochs" ] || avg=$num_epochs

source tools/env.sh

start=$(date +%s)
read -r -a model_list <<< "$models"
n_models=${#model_list[@]}
total_epochs=$((n_models * num_epochs))
epochs_done=0
train_seconds=0

hms() { printf '%dh%02dm%02ds' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
progress() {
  # Elapsed time, and the time left extrapolated from the epochs trained so far.
  local now elapsed left="unknown"
  now=$(date +%s); elapsed=$((now - start))
  if [ "$epochs_done" -gt 0 ]; then
    left=$(hms $(( train_seconds * (total_epochs - epochs_done) / epochs_done + n_models * 60 )))
  fi
  echo "==== [run.sh] $* | elapsed $(hms $elapsed) | estimated time left: $left"
}

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  progress "stage 0: prepare AN4"
  ./prepare.sh --dataset an4 --corpus-dir "$corpus_dir"
fi

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  for m in "${model_list[@]}"; do
    progress "stage 1: train $m ($num_epochs epochs)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    ./splitformer/train.py --preset "$m" --exp-dir "exp/$m" --num-epochs "$num_epochs" \
      --max-duration "$max_duration" $an4_train_args $extra_train_args
    train_seconds=$((train_seconds + $(date +%s) - t0))
    epochs_done=$((epochs_done + num_epochs))
  done
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  for m in "${model_list[@]}"; do
    progress "stage 2: decode every exit of $m"
    ./splitformer/decode.py --exp-dir "exp/$m" --epoch "$num_epochs" --avg "$avg" \
      --use-averaged-model --exit-layer all --decoding-method "$decoding_method" --max-duration 200
  done
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  progress "stage 3: report"
  dirs=()
  for m in "${model_list[@]}"; do dirs+=("exp/$m"); done
  ./splitformer/compare.py "${dirs[@]}" --out exp/report
  echo "report: exp/report/report.md"
fi
progress "done"
