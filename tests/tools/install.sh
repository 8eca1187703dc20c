#!/usr/bin/env bash
# What the tests use beyond the Python packages, installed once by the README's set-up:
#   - the Khronos glTF validator (npm, into tests/tools/node_modules);
#   - the pyzmq wheel the add-on zip bundles (PyPI, into build/addon-wheels), so the add-on
#     tests build offline;
#   - Debian's Blender 3.4 and its numpy, for the legacy add-on test under a real `blender -b`
#     (apt, as root or through sudo; elsewhere install Blender yourself and put it on PATH).
# Run from the repository root after the virtual environment exists: bash tests/tools/install.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}

npm ci --prefix tests/tools --no-audit --no-fund
"$python" build_addon.py --platform linux-x64 --no-legacy --out build/addon-dist

if ! command -v blender >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
        echo "install.sh: no blender on PATH and no root to apt-get it: the Blender 3.4 add-on test will fail" >&2
        exit 1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends blender python3-numpy
fi
