#!/usr/bin/env bash
# The main job: prepare AN4, train the Zipformer baseline, the early-exit baseline and the
# Splitformer with CPU presets, decode every exit of each, and write exp/report/.
#
#   ./run.sh [--schedule short|long] [--models "zipformer-cpu ee-zipformer-cpu splitformer-cpu"]
#            [--seeds "42"] [--exp-root exp] [--num-epochs N] [--avg N] [--max-duration S]
#            [--corpus-dir ../shared/data/an4] [--decoding-method greedy_search]
#            [--train-args "..."] [--stage 0] [--stop-stage 3]
#
# Stages: 0 prepare data, 1 train, 2 decode, 3 report. Each model trains into <exp-root>/<preset>
# (<exp-root>/<preset>-seed<N> for seeds other than 42); the report goes to <exp-root>/report/.
# --schedule short is the main job (about an hour on a 2-core CPU); long trains longer (see README).
set -euo pipefail
cd "$(dirname "$0")"

schedule=short
num_epochs=""
avg=""
models="zipformer-cpu ee-zipformer-cpu splitformer-cpu"
seeds="42"
exp_root=""
corpus_dir=../shared/data/an4
max_duration=""
decoding_method=greedy_search
stage=0
stop_stage=3
extra_train_args=""

while [ $# -gt 0 ]; do
  case "$1" in
    --schedule) schedule=$2; shift 2 ;;
    --num-epochs) num_epochs=$2; shift 2 ;;
    --avg) avg=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --exp-root) exp_root=$2; shift 2 ;;
    --corpus-dir) corpus_dir=$2; shift 2 ;;
    --max-duration) max_duration=$2; shift 2 ;;
    --decoding-method) decoding_method=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --train-args) extra_train_args=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The AN4 recipe (docs/an4-experiments.md says which runs chose each setting). AN4 is 0.6 h: small
# batches give enough updates, the warm-ups and the LR decay are counted in those updates, and the
# Zipformer's dropout/skip schedules (icefall's are ~100k LibriSpeech updates long) finish early.
an4_train_args="--warmup-batches 100 --warm-step 300 --lr-batches 1000 --lr-epochs 6 --average-period 4 --schedule-ref-duration 0.1 --enable-spec-aug false --train-variants narrowband,trimmed"
# clean test, and the robustness variants stage 0 makes (8 kHz and back; leading/trailing silence cut off)
test_sets="dev,test,test-narrowband,test-trimmed"
case "$schedule" in
  short) def_epochs=12; def_avg=4; def_max_duration=25 ;;
  long) def_epochs=60; def_avg=10; def_max_duration=25 ;;
  *) echo "run.sh: --schedule must be short or long, not '$schedule'" >&2; exit 2 ;;
esac
num_epochs=${num_epochs:-$def_epochs}
avg=${avg:-$def_avg}
max_duration=${max_duration:-$def_max_duration}
exp_root=${exp_root:-$([ "$schedule" = short ] && echo exp || echo exp/long)}
[ "$avg" -le "$num_epochs" ] || avg=$num_epochs

source tools/env.sh

start=$(date +%s)
read -r -a model_list <<< "$models"
read -r -a seed_list <<< "$seeds"
runs=()   # "preset seed dir"
for m in "${model_list[@]}"; do
  for s in "${seed_list[@]}"; do
    d="$exp_root/$m"; [ "$s" = 42 ] || d="$exp_root/$m-seed$s"
    runs+=("$m $s $d")
  done
done
n_runs=${#runs[@]}
total_epochs=$((n_runs * num_epochs))
epochs_done=0
train_seconds=0

hms() { printf '%dh%02dm%02ds' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
progress() {
  # Elapsed time, and the time left extrapolated from the epochs trained so far.
  local now elapsed left="unknown"
  now=$(date +%s); elapsed=$((now - start))
  if [ "$epochs_done" -gt 0 ]; then
    left=$(hms $(( train_seconds * (total_epochs - epochs_done) / epochs_done + n_runs * 60 )))
  fi
  echo "==== [run.sh] $* | elapsed $(hms $elapsed) | estimated time left: $left"
}

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  progress "stage 0: prepare AN4"
  ./prepare.sh --dataset an4 --corpus-dir "$corpus_dir" --variants true
fi

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  for r in "${runs[@]}"; do
    read -r m s d <<< "$r"
    progress "stage 1: train $m, seed $s ($num_epochs epochs) in $d"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    ./splitformer/train.py --preset "$m" --exp-dir "$d" --num-epochs "$num_epochs" --seed "$s" \
      --max-duration "$max_duration" $an4_train_args $extra_train_args
    train_seconds=$((train_seconds + $(date +%s) - t0))
    epochs_done=$((epochs_done + num_epochs))
  done
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  for r in "${runs[@]}"; do
    read -r m s d <<< "$r"
    progress "stage 2: decode every exit of $m, seed $s"
    ./splitformer/decode.py --exp-dir "$d" --epoch "$num_epochs" --avg "$avg" \
      --use-averaged-model --exit-layer all --decoding-method "$decoding_method" --max-duration 200 \
      --test-sets "$test_sets"
  done
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  progress "stage 3: report"
  dirs=(); names=()
  for r in "${runs[@]}"; do
    read -r m s d <<< "$r"
    dirs+=("$d"); names+=("$m")
  done
  ./splitformer/compare.py "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" --out "$exp_root/report" \
    --wall-seconds $(( $(date +%s) - start ))
  echo "report: $exp_root/report/report.md"
fi
progress "done"
