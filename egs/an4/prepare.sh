#!/usr/bin/env bash
# AN4 (CMU census/alphanumeric, 0.8 h). Only the corpus-specific step lives here: lhotse has no AN4
# recipe, so stage 1 uses local/an4.py. Everything else: local/stages.sh (`--help` lists the options).
set -euo pipefail
dataset=an4
# --dev-rule: how dev is held out of AN4's training list (local/an4.py)
recipe_options="dev_rule"
dev_rule=speakers
recipe_unrecorded="dev_rule=first-lines"  # what every AN4 data dir made before --dev-rule existed holds
recipe_usage="  --dev-rule RULE      an4: speakers (default: whole training speakers, both sexes in test's
                       proportion: local/an4.py) or first-lines (the first 100 training lines, 8 speakers, all
                       female: the split of the README's models before the main job was retrained on speakers)
"
# shellcheck source=../../local/stages.sh
source "$(dirname "$0")/../../local/stages.sh"

make_manifests() {
  "$PYTHON" "$_root/local/an4.py" --corpus-dir "$corpus_dir" --manifest-dir "$manifest_dir" --data-dir "$data_dir" \
    --dev-rule "$dev_rule"
}

run_stages "$@"
