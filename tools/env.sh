# Sourced by run.sh and run_tests.sh: make (or reuse) a virtualenv and install requirements.txt.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[env] creating virtualenv .venv"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch, lhotse, sentencepiece" 2>/dev/null || [ requirements.txt -nt "$VIRTUAL_ENV/.splitformer-reqs" ]; then
  echo "[env] installing requirements.txt into $VIRTUAL_ENV"
  python -m pip install -q -r requirements.txt
  touch "$VIRTUAL_ENV/.splitformer-reqs"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
