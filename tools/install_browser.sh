#!/usr/bin/env bash
# Installs Debian's Chromium and its driver for the browser test of the live page (tests/test_serve_browser.py).
# Needs root (apt-get); where it cannot install, the test skips and says why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[browser] Chromium is not installed and apt-get is not available as root: the browser test will skip" >&2
  exit 0
fi
echo "[browser] installing chromium and chromium-driver (Debian packages)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null; }; then
  echo "[browser] apt-get could not install chromium: the browser test will skip" >&2
fi
exit 0
