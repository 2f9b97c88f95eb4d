# Sourced by egs/<corpus>/prepare.sh: options, stage bookkeeping, and the corpus-independent stages.
#
# A recipe holds nothing but its corpus-specific steps: it sources this file, defines
#   make_manifests  stage 1: write $manifest_dir/${dataset}_{recordings,supervisions}_<split>.jsonl.gz
# (and get_corpus, stage 0, if the default below does not fit), then calls `run_stages "$@"`.
# A recipe's own options: list their names in recipe_options (each a variable holding its default) and their
# help in recipe_usage; they are parsed as --name-with-hyphens VALUE and belong to stage 1's settings, so that
# changing one remakes the manifests and everything after them.
# Stage 1 ends with local/make_cuts.py (the shared audio/transcript checks).
#
# A stage announces itself when it runs. It is skipped when its outputs exist and a marker in
# $data_dir/.done/ says it completed with the same settings; running a stage invalidates the later ones.

_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

# defaults (every one can be given as --name value; dataset comes from the recipe or --dataset)
stage=0
stop_stage=7
corpus_dir=""
data_dir=data
download_dir=download
num_jobs=$(nproc 2>/dev/null || echo 2); [ "$num_jobs" -gt 8 ] && num_jobs=8
speed_perturb=false
variants=false
conditions=false
vocab_size=""
recipe_options=${recipe_options:-}
recipe_usage=${recipe_usage:-}

usage() {
  cat <<EOF
Usage: $0 [options]
  --dataset NAME       an4 | librispeech | mini_librispeech | tedlium3   (default: ${dataset})
  --corpus-dir DIR     use this copy of the corpus instead of downloading (stage 0)
  --download-dir DIR   where stage 0 downloads to (default: ${download_dir})
  --data-dir DIR       outputs: manifests/, fbank/, lang_bpe_<N>/, <split>_rejected.txt (default: ${data_dir})
  --stage N            first stage to run (default: ${stage})
  --stop-stage N       last stage to run (default: ${stop_stage})
  --num-jobs N         threads for audio checks, processes for fbank of splits over 2000 cuts (default: ${num_jobs})
  --speed-perturb BOOL add 0.9x/1.1x copies of the training cuts (default: ${speed_perturb})
  --variants BOOL      stage 6: narrowband (8 kHz and back) and silence-trimmed copies of the training,
                       dev and test splits, as <split>-narrowband and <split>-trimmed: test sets for decode.py,
                       and augmentation for train.py --train-variants (default: ${variants}). Labelled
                       matched in <data-dir>/fbank/<dataset>_conditions.json
  --conditions BOOL    stage 7: test sets under conditions no training run uses (unmatched), as
                       <test split>-<condition>: telephone, babble10, babble20, reverb, speed0.9, speed1.1,
                       quiet (see local/conditions.py); labelled unmatched in the same file (default: ${conditions})
  --vocab-size N       BPE pieces (default: the corpus's, see splitformer/data/recipes.py)
${recipe_usage}Stages: 0 corpus, 1 manifests, 2 speed perturbation, 3 fbank, 4 BPE, 5 validation, 6 variants,
7 unmatched test conditions.
EOF
}

# stage 0 default: check --corpus-dir, or download with local/corpus.py; leaves the corpus in $corpus_dir
get_corpus() {
  if [ -n "$corpus_dir" ]; then
    log "using the existing copy in $corpus_dir"
    "$PYTHON" "$_root/local/corpus.py" check --dataset "$dataset" --corpus-dir "$corpus_dir" >/dev/null \
      || die "$corpus_dir is not a usable $dataset corpus (see above)"
  else
    corpus_dir=$("$PYTHON" "$_root/local/corpus.py" download --dataset "$dataset" --download-dir "$download_dir") \
      || die "could not download $dataset into $download_dir; pass --corpus-dir to use a copy you have"
  fi
}

log() { echo "$(date '+%F %T') [prepare] $*"; }
die() { echo "$(date '+%F %T') [prepare] ERROR: $*" >&2; exit 1; }

parse_options() {
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --*)
        local name="${1#--}"; name="${name//-/_}"
        case " dataset stage stop_stage corpus_dir data_dir download_dir num_jobs speed_perturb variants conditions vocab_size $recipe_options " in
          *" $name "*) ;;
          *) usage >&2; die "unknown option $1" ;;
        esac
        [ $# -ge 2 ] || die "option $1 needs a value"
        printf -v "$name" '%s' "$2"; shift 2 ;;
      *) usage >&2; die "unexpected argument $1" ;;
    esac
  done
  case "$speed_perturb" in true|false) ;; *) die "--speed-perturb must be true or false, not '$speed_perturb'" ;; esac
  case "$variants" in true|false) ;; *) die "--variants must be true or false, not '$variants'" ;; esac
  case "$conditions" in true|false) ;; *) die "--conditions must be true or false, not '$conditions'" ;; esac
  [[ "$stage" =~ ^[0-9]+$ && "$stop_stage" =~ ^[0-9]+$ ]] || die "--stage/--stop-stage must be integers"
  [[ "$num_jobs" =~ ^[1-9][0-9]*$ ]] || die "--num-jobs must be a positive integer"
}

# the recipe's own options as name=value words (stage 1's settings: changing one remakes the manifests)
recipe_settings() {
  # recipe_unrecorded: "name=value" pairs that data prepared before the option existed was made with; they are
  # left out of the settings, so that such a data dir is not remade for an option that changes nothing
  local o out=""
  for o in $recipe_options; do
    case " ${recipe_unrecorded:-} " in *" $o=${!o} "*) continue ;; esac
    out+=" $o=${!o}"
  done
  printf '%s' "$out"
}

# dataset facts from splitformer/data/recipes.py (one place for split names)
dataset_info() {
  "$PYTHON" -c "
import sys
from splitformer.data.recipes import get_dataset
d = get_dataset(sys.argv[1])
print(' '.join(d.all_splits())); print(' '.join(d.train_splits)); print(d.default_vocab_size)
print(' '.join(s for s in d.test_splits if s != d.dev_split)); print(d.dev_split)
" "$dataset"
}

_marker() { echo "$data_dir/.done/${dataset}.stage$1"; }

# begin_stage N DESCRIPTION SETTINGS OUTPUT... : 0 if the stage must run now, 1 to skip it
begin_stage() {
  local n=$1 what=$2 settings=$3; shift 3
  if [ "$n" -lt "$stage" ] || [ "$n" -gt "$stop_stage" ]; then return 1; fi
  local marker; marker=$(_marker "$n")
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$settings" ]; then
    local missing=0 f
    for f in "$@"; do [ -e "$f" ] || missing=1; done
    if [ $missing -eq 0 ]; then
      log "Stage $n: $what: already complete, skipping"
      return 1
    fi
  fi
  log "Stage $n: $what"
  rm -f "$marker"  # until it completes
  return 0
}

# end_stage N SETTINGS: mark stage N complete; the later stages used its old outputs, so they must rerun
end_stage() {
  local later
  for later in $(seq "$(($1 + 1))" 9); do rm -f "$(_marker "$later")"; done
  mkdir -p "$data_dir/.done"
  printf '%s' "$2" > "$(_marker "$1")"
}

run_stages() {
  parse_options "$@"
  local info; info=$(dataset_info) || die "unknown --dataset '$dataset'"
  splits=$(sed -n 1p <<<"$info")
  train_splits=$(sed -n 2p <<<"$info")
  vocab_size=${vocab_size:-$(sed -n 3p <<<"$info")}
  test_only_splits=$(sed -n 4p <<<"$info")
  dev_split=$(sed -n 5p <<<"$info")
  manifest_dir=$data_dir/manifests
  fbank_dir=$data_dir/fbank
  lang_dir=$data_dir/lang_bpe_${vocab_size}
  local corpus_file="$data_dir/.done/${dataset}.corpus_dir"
  log "dataset=$dataset splits=[$splits] data_dir=$data_dir stages $stage..$stop_stage num_jobs=$num_jobs"
  # one corpus per data dir: split names (<split>_rejected.txt) and lang_bpe_<N> would collide
  local m other
  for m in "$data_dir"/.done/*.stage[0-9]; do
    [ -e "$m" ] || continue
    other=$(basename "${m%.stage*}")
    [ "$other" = "$dataset" ] || die "$data_dir already holds $other; give $dataset its own --data-dir (e.g. --data-dir data_$dataset)"
  done

  local s outs
  # ---- stage 0: the corpus ------------------------------------------------------------------
  # stage 0 is keyed by where the corpus comes from: an absolute --corpus-dir, else the copy
  # recorded by an earlier run, else the download dir
  local key0
  if [ -n "$corpus_dir" ] && [ -d "$corpus_dir" ]; then
    key0=$(cd "$corpus_dir" && pwd)
  elif [ -z "$corpus_dir" ] && [ -f "$corpus_file" ]; then
    key0=$(cat "$corpus_file"); corpus_dir=$key0
  else
    key0=${corpus_dir:-download:$download_dir}
  fi
  if begin_stage 0 "get the ${dataset} corpus" "$key0" "$corpus_file"; then
    get_corpus
    corpus_dir=$(cd "$corpus_dir" && pwd)
    mkdir -p "$data_dir/.done"; echo "$corpus_dir" > "$corpus_file"
    log "corpus at $corpus_dir"
    end_stage 0 "$key0"
  fi
  # an explicit --corpus-dir wins; otherwise use where stage 0 found the corpus
  if [ -n "$corpus_dir" ]; then
    [ -d "$corpus_dir" ] || die "--corpus-dir $corpus_dir is not a directory"
    corpus_dir=$(cd "$corpus_dir" && pwd)
  elif [ -f "$corpus_file" ]; then
    corpus_dir=$(cat "$corpus_file")
  fi

  # ---- stage 1: manifests + checked cuts --------------------------------------------------------
  outs=(); for s in $splits; do outs+=("$manifest_dir/${dataset}_cuts_${s}.jsonl.gz" "$data_dir/${s}_rejected.txt"); done
  local settings1; settings1="corpus=$corpus_dir$(recipe_settings)"
  if begin_stage 1 "lhotse manifests and audio/transcript checks" "$settings1" "${outs[@]}"; then
    [ -n "$corpus_dir" ] || die "stage 1 needs the corpus: run stage 0 or give --corpus-dir"
    mkdir -p "$manifest_dir"
    for s in $splits; do rm -f "$data_dir/${s}_rejected.txt"; done  # reports start afresh with the manifests
    make_manifests
    # shellcheck disable=SC2086
    "$PYTHON" "$_root/local/make_cuts.py" --dataset "$dataset" --splits $splits \
      --manifest-dir "$manifest_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
    end_stage 1 "$settings1"
  fi

  # ---- stage 2: speed perturbation (optional) ---------------------------------------------------
  outs=(); for s in $train_splits; do outs+=("$manifest_dir/${dataset}_cuts_${s}_sp.jsonl.gz"); done
  if [ "$speed_perturb" = true ]; then
    if begin_stage 2 "speed perturbation 0.9/1.1 of [$train_splits]" "sp" "${outs[@]}"; then
      # shellcheck disable=SC2086
      "$PYTHON" "$_root/local/speed_perturb.py" --dataset "$dataset" --splits $train_splits --manifest-dir "$manifest_dir"
      end_stage 2 "sp"
    fi
  elif [ 2 -ge "$stage" ] && [ 2 -le "$stop_stage" ]; then
    log "Stage 2: speed perturbation: off (--speed-perturb false), skipping"
  fi

  # ---- stage 3: fbank ------------------------------------------------------------------------
  outs=(); for s in $splits; do outs+=("$fbank_dir/${dataset}_cuts_${s}.jsonl.gz"); done
  if begin_stage 3 "80-dim fbank features" "speed_perturb=$speed_perturb" "${outs[@]}"; then
    local sp_splits=""; [ "$speed_perturb" = true ] && sp_splits=$train_splits
    # shellcheck disable=SC2086
    "$PYTHON" "$_root/local/compute_fbank.py" --dataset "$dataset" --splits $splits --sp-splits $sp_splits \
      --manifest-dir "$manifest_dir" --fbank-dir "$fbank_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
    end_stage 3 "speed_perturb=$speed_perturb"
  fi

  # ---- stage 4: BPE --------------------------------------------------------------------------
  if begin_stage 4 "BPE with $vocab_size pieces" "vocab_size=$vocab_size" "$lang_dir/bpe.model" "$lang_dir/tokens.txt"; then
    # shellcheck disable=SC2086
    "$PYTHON" "$_root/local/train_bpe.py" --dataset "$dataset" --train-splits $train_splits \
      --manifest-dir "$manifest_dir" --lang-dir "$lang_dir" --vocab-size "$vocab_size"
    end_stage 4 "vocab_size=$vocab_size"
  fi

  # ---- stage 5: validation -------------------------------------------------------------------
  if begin_stage 5 "validate every cut" "validated" "${outs[@]}"; then
    # shellcheck disable=SC2086
    "$PYTHON" "$_root/local/validate.py" --dataset "$dataset" --splits $splits \
      --fbank-dir "$fbank_dir" --data-dir "$data_dir"
    end_stage 5 "validated"
  fi

  # ---- stage 6: narrowband and trimmed variants of the training, dev and test splits (optional): dev's
  # copies are there so that the training variants can be chosen on dev (docs/an4-experiments.md) -------
  if [ "$variants" = true ]; then
    local variant_splits="$train_splits $dev_split $test_only_splits"
    outs=(); for s in $variant_splits; do outs+=("$fbank_dir/${dataset}_cuts_${s}-narrowband.jsonl.gz" "$fbank_dir/${dataset}_cuts_${s}-trimmed.jsonl.gz"); done
    if begin_stage 6 "narrowband and trimmed copies of [$variant_splits]" "variants" "${outs[@]}"; then
      # shellcheck disable=SC2086
      "$PYTHON" "$_root/local/make_variants.py" --dataset "$dataset" --splits $variant_splits \
        --manifest-dir "$manifest_dir" --fbank-dir "$fbank_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
      end_stage 6 "variants"
    fi
  elif [ 6 -ge "$stage" ] && [ 6 -le "$stop_stage" ]; then
    log "Stage 6: variants: off (--variants false), skipping"
  fi

  # ---- stage 7: unmatched test conditions (optional) -------------------------------------------------
  local cond_names="telephone babble10 babble20 reverb speed0.9 speed1.1 quiet" c
  if [ "$conditions" = true ]; then
    outs=("$fbank_dir/${dataset}_conditions.json")
    for s in $test_only_splits; do for c in $cond_names; do outs+=("$fbank_dir/${dataset}_cuts_${s}-${c}.jsonl.gz"); done; done
    if begin_stage 7 "unmatched test conditions of [$test_only_splits]: $cond_names" "conditions" "${outs[@]}"; then
      # shellcheck disable=SC2086
      "$PYTHON" "$_root/local/conditions.py" --dataset "$dataset" --splits $test_only_splits --conditions $cond_names \
        --manifest-dir "$manifest_dir" --fbank-dir "$fbank_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
      end_stage 7 "conditions"
    fi
  elif [ 7 -ge "$stage" ] && [ 7 -le "$stop_stage" ]; then
    log "Stage 7: unmatched test conditions: off (--conditions false), skipping"
  fi
  log "done: $dataset in $data_dir"
}
