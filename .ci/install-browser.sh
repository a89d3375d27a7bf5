#!/usr/bin/env bash
# Install the browser the view's tests drive (tests/test_view_browser.py): headless Chromium and its
# chromedriver from Debian's packages (selenium itself comes with the 'test' extra). Run as root.
# Idempotent: nothing is installed when both are already on PATH.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if ((${#need[@]})); then
  echo "install-browser: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "install-browser: ok ($(chromedriver --version 2>/dev/null | head -1))"
