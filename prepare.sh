#!/usr/bin/env bash
# Data preparation, staged like icefall's. Dispatches to egs/<recipe>/prepare.sh.
#   ./prepare.sh [--dataset an4|librispeech|mini_librispeech|tedlium3] [--corpus-dir DIR]
#                [--stage N] [--stop-stage N] [--num-jobs N] [--speed-perturb true|false]
#                [--vocab-size N] [--data-dir data] [--download-dir download]
# Outputs in data/: manifests/, fbank/, lang_bpe_<N>/, <split>_rejected.txt. `--help` for details.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

dataset=an4
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) [ $# -ge 2 ] || { echo "--dataset needs a value" >&2; exit 1; }; dataset="$2"; shift 2 ;;
    --dataset=*) dataset="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

PYTHON=${PYTHON:-python3}
# find_spec, not import: importing lhotse costs a second or two
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('lhotse', 'sentencepiece', 'soundfile')))" 2>/dev/null; then
  # no ready environment: make/reuse the project's virtualenv the way run.sh does
  pushd "$root" >/dev/null
  # shellcheck disable=SC1091
  source tools/env.sh >&2
  popd >/dev/null
fi

recipe=$("$PYTHON" -c "import sys; from splitformer.data.recipes import DATASETS as D; print(D[sys.argv[1]].recipe)" "$dataset" 2>/dev/null) \
  || { echo "unknown --dataset '$dataset'; choose one of: an4 librispeech mini_librispeech tedlium3" >&2; exit 1; }
exec "$root/egs/$recipe/prepare.sh" --dataset "$dataset" ${args[@]+"${args[@]}"}
