#!/usr/bin/env bash
# TED-LIUM 3 (legacy train/dev/test split): manifests by lhotse's prepare_tedlium through
# local/lhotse_recipes.py; talks are cut into their STM segments by local/make_cuts.py.
# Everything else: local/stages.sh (`--help`).
set -euo pipefail
dataset=tedlium3
# shellcheck source=../../local/stages.sh
source "$(dirname "$0")/../../local/stages.sh"

make_manifests() {
  "$PYTHON" "$_root/local/lhotse_recipes.py" --dataset "$dataset" --corpus-dir "$corpus_dir" \
    --manifest-dir "$manifest_dir" --data-dir "$data_dir" --num-jobs "$num_jobs"
}

run_stages "$@"
