#!/usr/bin/env bash
# AN4 (CMU census/alphanumeric, 0.8 h). Only the corpus-specific step lives here: lhotse has no AN4
# recipe, so stage 1 uses local/an4.py. Everything else: local/stages.sh (`--help` lists the options).
set -euo pipefail
dataset=an4
# shellcheck source=../../local/stages.sh
source "$(dirname "$0")/../../local/stages.sh"

make_manifests() {
  "$PYTHON" "$_root/local/an4.py" --corpus-dir "$corpus_dir" --manifest-dir "$manifest_dir" --data-dir "$data_dir"
}

run_stages "$@"
