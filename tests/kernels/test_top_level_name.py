"""`kernels/` is `dsla_hf.kernels`: from a clone's root it must not pass for Hugging Face's `kernels` package."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_from_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the current directory first on sys.path, as `python -m pytest` and pytest's rootdir do.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transformers_imports_from_the_repository_root():
    done = run_from_root(
        "import transformers.integrations.hub_kernels, dsla_hf.kernels as k; print(k.chunk_dsla.__module__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dsla_hf.kernels.chunk"


def test_top_level_kernels_is_the_installed_package():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here: nothing to shadow")
    done = run_from_root("import kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).resolve().is_relative_to(ROOT)
