#!/usr/bin/env bash
# Builds fast_rnnt (the C++ pruned RNN-T loss from the k2 authors) from its PyPI source, CPU only, into the
# active Python environment. Used only to cross-check and benchmark splitformer.losses; training never needs it.
#
# Why a script: the PyPI sdist fetches pybind11 2.6 from GitHub at configure time (no network in CI, and 2.6
# does not build with current compilers/Python), defaults to C++14 (current torch headers need C++17), and
# turns CUDA on whenever an `nvcc` is on PATH. We feed it a local pybind11 source, C++17 and CUDA off.
#
# Idempotent: does nothing when `import fast_rnnt` already works.
# Env: PYTHON (default: python of the active venv), FAST_RNNT_VERSION (1.3), PYBIND11_VERSION (3.0.4), JOBS (2).
set -euo pipefail

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  PY="$(command -v python3)"
fi
FAST_RNNT_VERSION="${FAST_RNNT_VERSION:-1.3}"
PYBIND11_VERSION="${PYBIND11_VERSION:-3.0.4}"
JOBS="${JOBS:-2}"

if "$PY" -c "import fast_rnnt" 2>/dev/null; then
  echo "[install_fast_rnnt] fast_rnnt already importable with $PY; nothing to do"
  exit 0
fi

start=$(date +%s)
# --no-build-isolation builds with this environment's setuptools; venvs of Python >= 3.12 have none.
"$PY" -c "import setuptools, wheel" 2>/dev/null || "$PY" -m pip install -q setuptools wheel

work="$(mktemp -d "${TMPDIR:-/tmp}/fast_rnnt_build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "[install_fast_rnnt] downloading sources into $work"
"$PY" -m pip download -q --no-deps --no-binary :all: "fast_rnnt==${FAST_RNNT_VERSION}" -d .
"$PY" -m pip download -q --no-deps --no-binary :all: "pybind11==${PYBIND11_VERSION}" -d .
tar xzf "fast_rnnt-${FAST_RNNT_VERSION}.tar.gz"
tar xzf "pybind11-${PYBIND11_VERSION}.tar.gz"
[ -f "pybind11-${PYBIND11_VERSION}/CMakeLists.txt" ] || {
  echo "[install_fast_rnnt] pybind11-${PYBIND11_VERSION} sdist has no CMakeLists.txt; pick another PYBIND11_VERSION" >&2
  exit 1
}

# The package's core library reads PYTHON_INCLUDE_DIRS, which only pybind11 2.x's own FindPython set.
py_include="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"

# FT_CMAKE_ARGS replaces the package's defaults entirely, so repeat them (Release, no tests).
export FT_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DFT_BUILD_TESTS=OFF -DFT_WITH_CUDA=OFF \
-DCMAKE_CXX_STANDARD=17 -DFETCHCONTENT_SOURCE_DIR_PYBIND11=$work/pybind11-${PYBIND11_VERSION} \
-DFETCHCONTENT_FULLY_DISCONNECTED=ON -DPYTHON_EXECUTABLE=$PY -DPYTHON_INCLUDE_DIRS=$py_include"
export FT_MAKE_ARGS="-j${JOBS}"
echo "[install_fast_rnnt] FT_CMAKE_ARGS=$FT_CMAKE_ARGS"

# --no-deps: its requirements.txt says torch>=1.5, and pip must never touch the pinned torch.
"$PY" -m pip install --no-deps --no-build-isolation --no-cache-dir "./fast_rnnt-${FAST_RNNT_VERSION}"

cd /
"$PY" -c "import fast_rnnt, torch; print('[install_fast_rnnt] fast_rnnt', fast_rnnt.__version__, 'with torch', torch.__version__)"
echo "[install_fast_rnnt] built and installed in $(( $(date +%s) - start )) s"
