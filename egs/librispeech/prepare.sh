#!/usr/bin/env bash
# LibriSpeech (960 h) and mini LibriSpeech (--dataset mini_librispeech): manifests by lhotse's
# prepare_librispeech through local/lhotse_recipes.py. Everything else: local/stages.sh (`--help`).
set -euo pipefail
dataset=librispeech
# shellcheck source=../../local/stages.sh
source "$(dirname "$0")/../../local/stages.sh"

make_manifests() {
  "$PYTHON" "$_root/local/lhotse_recipes.py" --dataset "$dataset" --corpus-dir "$corpus_dir" \
    --manifest-dir "$manifest_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
}

run_stages "$@"
