#!/usr/bin/env bash
# The main job: prepare AN4, train the Zipformer baseline, the early-exit baseline and the
# Splitformer with CPU presets, decode every exit of each, and write exp/report/.
#
#   ./run.sh [--schedule short|long] [--models "zipformer-cpu ee-zipformer-cpu splitformer-cpu"]
#            [--seeds "42"] [--exp-root exp] [--num-epochs N] [--avg "4 2 6 8"] [--max-duration S]
#            [--corpus-dir ../shared/data/an4] [--decoding-method greedy_search] [--jobs 2]
#            [--streaming false] [--train-args "..."] [--stage 0] [--stop-stage 3]
#
# Stages: 0 prepare data, 1 train, 2 decode, 3 report. --avg with several values chooses each model's average on
# dev (the lowest dev WER at the last exit; a tie goes to the first listed) before any other set is decoded, and
# writes the choice to <dir>/chosen-avg.txt; one value fixes it. Each model trains into <exp-root>/<preset>
# (<exp-root>/<preset>-seed<N> for seeds other than 42); the report goes to <exp-root>/report/.
# --jobs N trains N models at a time, each on (cores / N) threads, longest first (on 2 cores two 1-thread
# runs finish the three models in about two thirds of the time one 2-thread run after another takes).
# --streaming true adds the causal Splitformer (splitformer-cpu-causal) and decodes every causal model as a
# stream too: 320 and 640 ms chunks at every exit, and per-chunk dynamic exits at half the last exit's compute.
# --schedule short is the main job (about 40 minutes on a 2-core CPU); long trains longer (see README).
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
jobs=""
streaming=false

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
    --jobs) jobs=$2; shift 2 ;;
    --streaming) streaming=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The AN4 recipe (docs/an4-experiments.md says which runs chose each setting). AN4 is 0.6 h: small
# batches give enough updates, the warm-ups and the LR decay are counted in those updates, and the
# Zipformer's dropout/skip schedules (icefall's are ~100k LibriSpeech updates long) finish early.
an4_train_args="--warmup-batches 100 --warm-step 300 --lr-batches 1000 --lr-epochs 6 --average-period 4 --schedule-ref-duration 0.1 --enable-spec-aug false --train-variants narrowband,trimmed"
# clean test; the matched variants stage 0 makes (8 kHz and back; leading/trailing silence cut off: training
# swaps cuts for them); and the unmatched conditions no training run uses (prepare.sh --conditions true)
test_sets="dev,test,test-narrowband,test-trimmed,test-telephone,test-babble20,test-babble10,test-reverb,test-speed0.9,test-speed1.1,test-quiet"
case "$schedule" in
  short) def_epochs=12; def_avg="4 2 6 8"; def_max_duration=25 ;;
  long) def_epochs=60; def_avg="10 5 15 20"; def_max_duration=25 ;;
  *) echo "run.sh: --schedule must be short or long, not '$schedule'" >&2; exit 2 ;;
esac
case "$streaming" in
  true) case " $models " in *" splitformer-cpu-causal "*) ;; *) models="$models splitformer-cpu-causal" ;; esac ;;
  false) ;;
  *) echo "run.sh: --streaming must be true or false, not '$streaming'" >&2; exit 2 ;;
esac
cores=$(nproc 2>/dev/null || echo 1)
jobs=${jobs:-$(( cores >= 2 ? 2 : 1 ))}
[ "$jobs" -ge 1 ] || { echo "run.sh: --jobs must be >= 1" >&2; exit 2; }
num_epochs=${num_epochs:-$def_epochs}
avg=${avg:-$def_avg}
max_duration=${max_duration:-$def_max_duration}
exp_root=${exp_root:-$([ "$schedule" = short ] && echo exp || echo exp/long)}
avg_choices=""
for a in ${avg//,/ }; do
  [[ "$a" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --avg takes positive integers, not '$a'" >&2; exit 2; }
  [ "$a" -le "$num_epochs" ] || a=$num_epochs
  case " $avg_choices " in *" $a "*) ;; *) avg_choices="$avg_choices $a" ;; esac
done
read -r -a avg_list <<< "$avg_choices"
[ "${#avg_list[@]}" -ge 1 ] || { echo "run.sh: --avg needs a value" >&2; exit 2; }

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
[ "$jobs" -le "$n_runs" ] || jobs=$n_runs
threads=$(( cores / jobs )); [ "$threads" -ge 1 ] || threads=1

hms() { printf '%dh%02dm%02ds' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
progress() { echo "==== [run.sh] $* | elapsed $(hms $(( $(date +%s) - start )))"; }

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  progress "stage 0: prepare AN4"
  ./prepare.sh --dataset an4 --corpus-dir "$corpus_dir" --variants true --conditions true
fi

# Training cost of a preset relative to the others (seconds per epoch on one thread here), so that --jobs
# starts the longest runs first and the lanes end together.
train_weight() {
  case "$1" in
    zipformer-cpu) echo 163 ;; splitformer-cpu-causal) echo 95 ;;
    splitformer-cpu|zipformer-cpu-lite|ee-zipformer-cpu-matched) echo 86 ;;
    *) echo 84 ;;
  esac
}

train_one() {  # preset seed dir: one run, its log in <dir>/log/train-stdout.txt (tail shown on failure)
  local m=$1 s=$2 d=$3
  mkdir -p "$d/log"
  # shellcheck disable=SC2086
  if ! ./splitformer/train.py --preset "$m" --exp-dir "$d" --num-epochs "$num_epochs" --seed "$s" \
      --max-duration "$max_duration" --num-threads "$threads" $an4_train_args $extra_train_args \
      --progress-bar "$([ "$jobs" = 1 ] && echo true || echo false)" > "$d/log/train-stdout.txt" 2>&1; then
    echo "run.sh: training $m (seed $s) failed; the end of $d/log/train-stdout.txt:" >&2
    tail -n 30 "$d/log/train-stdout.txt" >&2
    return 1
  fi
}

chosen_avg() {  # dir: the --avg stage 2 chose for it (the only one when one was given)
  if [ "${#avg_list[@]}" = 1 ]; then echo "${avg_list[0]}"; return; fi
  [ -s "$1/chosen-avg.txt" ] || { echo "run.sh: $1/chosen-avg.txt is missing: run stage 2 first" >&2; return 1; }
  head -n 1 "$1/chosen-avg.txt"
}

choose_avg() {  # preset seed dir: decode dev at every --avg and keep the lowest last-exit WER in <dir>/chosen-avg.txt
  local m=$1 s=$2 d=$3 a
  for a in "${avg_list[@]}"; do
    progress "stage 2: choose the average of $m, seed $s, on dev: --avg $a"
    ./splitformer/decode.py --exp-dir "$d" --epoch "$num_epochs" --avg "$a" --num-threads "$threads" \
      --use-averaged-model --exit-layer all --decoding-method "$decoding_method" --max-duration 200 \
      --test-sets dev || return 1
  done
  ./splitformer/compare.py "$d" --choose-avg "${avg_list[*]}" --epoch "$num_epochs" --choose-on dev \
    --method "$decoding_method" > "$d/chosen-avg.txt" || return 1
  progress "stage 2: $m, seed $s: $(tail -n 1 "$d/chosen-avg.txt"); chosen --avg $(head -n 1 "$d/chosen-avg.txt")"
}

decode_one() {  # preset seed dir: every exit of every test set, and with --streaming a causal model as a stream
  local m=$1 s=$2 d=$3 sets=$test_sets avg
  if [ "${#avg_list[@]}" -gt 1 ]; then
    choose_avg "$m" "$s" "$d" || return 1
    sets=${test_sets#dev,}  # dev is decoded at the chosen average already
  fi
  avg=$(chosen_avg "$d") || return 1
  progress "stage 2: decode every exit of $m, seed $s (--avg $avg)"
  ./splitformer/decode.py --exp-dir "$d" --epoch "$num_epochs" --avg "$avg" --num-threads "$threads" \
    --use-averaged-model --exit-layer all --decoding-method "$decoding_method" --max-duration 200 \
    --test-sets "$sets" || return 1
  if [ "$streaming" = true ] && [[ "$m" == *-causal ]]; then
    # 320 and 640 ms chunks (8 and 16 frames of 40 ms) with 2.56 and 5.12 s of left context, as icefall
    # decodes its 320/640 ms models; then per-chunk exits at half the last exit's compute, the threshold of
    # each criterion chosen on dev
    local ckpt=(--exp-dir "$d" --epoch "$num_epochs" --avg "$avg" --use-averaged-model --num-threads "$threads"
                --decoding-method "$decoding_method")
    local c l strategy scorer
    for cl in "8 64" "16 128"; do
      read -r c l <<< "$cl"
      progress "stage 2: stream $m in chunks of $c frames"
      ./splitformer/streaming_decode.py "${ckpt[@]}" --exit-layer all --chunk-size "$c" --left-context-frames "$l" \
        --test-sets dev,test || return 1
    done
    for crit in "confidence ctc" "confidence transducer" "entropy transducer"; do
      read -r strategy scorer <<< "$crit"
      progress "stage 2: stream $m with per-chunk exits ($strategy, $scorer) at half the compute"
      ./splitformer/streaming_decode.py "${ckpt[@]}" --chunk-size 8 --left-context-frames 64 --test-sets test \
        --exit-strategy "$strategy" --exit-scorer "$scorer" --exit-budget-fraction 0.5 || return 1
    done
  fi
}

do_train=false; do_decode=false
[ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ] && do_train=true
[ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ] && do_decode=true

if [ "$do_train" = true ]; then
  # longest first, at most $jobs at a time; a model is decoded (stage 2) in its own lane as soon as it is trained,
  # while the other lanes go on training
  mapfile -t ordered < <(for r in "${runs[@]}"; do read -r m _ _ <<< "$r"; echo "$(train_weight "$m") $r"; done \
                         | sort -k1,1nr | cut -d' ' -f2-)
  running=0
  failed=0
  for r in "${ordered[@]}"; do
    while [ "$running" -ge "$jobs" ]; do
      wait -n || failed=1
      running=$((running - 1))
    done
    read -r m s d <<< "$r"
    progress "stage 1: train $m, seed $s ($num_epochs epochs, $threads thread(s), $jobs at a time) in $d"
    { train_one "$m" "$s" "$d" && { [ "$do_decode" = false ] || decode_one "$m" "$s" "$d"; }; } &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
  done
  [ "$failed" = 0 ] || { echo "run.sh: a training or decoding run failed (see above)" >&2; exit 1; }
elif [ "$do_decode" = true ]; then
  threads=$cores
  for r in "${runs[@]}"; do
    read -r m s d <<< "$r"
    decode_one "$m" "$s" "$d" || exit 1
  done
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  progress "stage 3: report"
  dirs=(); names=(); ckpts=()
  for r in "${runs[@]}"; do
    read -r m s d <<< "$r"
    dirs+=("$d"); names+=("$m"); ckpts+=("epoch-${num_epochs}_avg-$(chosen_avg "$d")_use-averaged-model")
  done
  ./splitformer/compare.py "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" --out "$exp_root/report" \
    --checkpoint "$(IFS=,; echo "${ckpts[*]}")" --conditions data/fbank/an4_conditions.json \
    --wall-seconds $(( $(date +%s) - start ))
  echo "report: $exp_root/report/report.md"
fi
progress "done"
