#!/usr/bin/env bash
# Creates .venv and installs fedmets with everything it needs (CPU build of torch).
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
# GPU hospitals: set FEDMETS_TORCH_SPEC (e.g. "torch==2.13.0 --index-url <your CUDA wheel index>"),
# see docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_SPEC=${FEDMETS_TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.fedmets-install-stamp
want=$( (cat pyproject.toml scripts/install.sh; echo "$TORCH_SPEC") | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    exit 0
fi

"$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# shellcheck disable=SC2086
"${pip[@]}" install $TORCH_SPEC
# pyradiomics 3.x ships no wheel for Python 3.11: build it against the venv's numpy.
"${pip[@]}" install numpy setuptools wheel versioneer
"${pip[@]}" install --no-build-isolation "pyradiomics>=3.0.1"
# The editable build warns about folders named like the package (fedmets/ is that package).
PYTHONWARNINGS=ignore "${pip[@]}" install -e ".[dev]"
# Debian packages the tests use, installed only as root with apt, best effort (never fails the
# install): Chromium renders the report page in tests/test_report.py (skipped without it);
# nginx-light is the centre's proxy in the deployment tests (fedmets.server.proxy).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1 && ((${#missing[@]})); then
    apt-get update -qq >/dev/null 2>&1 || true
    for package in "${missing[@]}"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1 \
            || echo "note: could not install $package (see docs/install.md)"
    done
fi
echo "$want" > "$stamp"
echo "fedmets installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
