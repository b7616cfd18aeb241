"""The prepared GPU check, rehearsed on CPU: `benchmarks/gpu_check.py --dry` runs every section at tiny shapes (the
Triton kernels under TRITON_INTERPRET=1) and writes the report a GPU run would write; its checks can fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SECTIONS = ("kernels", "speed", "layer prefill", "decode", "generate", "engine", "training", "remote code")
KERNELS = ("chunk_dsla", "fold_kv", "chunk_dsla varlen", "chunk_dsla backward", "fused_recurrent_dsla",
           "fused_decode_dsla")  # fmt: skip

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry"] and not result["errors"]
    assert set(SECTIONS) <= set(result["sections"])
    # Every kernel at both layer shapes in fp32 and bf16, each within its tolerance of the naive recurrence.
    cases = {(c["kernel"], c["case"].split()[0], c["case"].split()[-1]) for c in result["checks"]}
    assert cases == {(k, s, d) for k in KERNELS for s in ("smollm2", "llama3_8b") for d in ("float32", "bfloat16")}
    assert all(c["ok"] for c in result["checks"])
    backward = next(c for c in result["checks"] if c["kernel"] == "chunk_dsla backward")
    assert {"dq", "dk", "dv", "dg", "dmix", "dinitial_state"} <= set(backward["errors"])
    sections = result["sections"]
    assert all(sections[name]["ok"] for name in ("generate", "engine", "training", "remote code"))
    switch = sections["generate"]["switch"]  # the prompt outgrows the window: the folded states hold something
    assert 0 < switch["state"] <= 2**-7 and 0 < switch["window"] <= 2**-7
    assert sections["speed"]["chunk"] and sections["decode"]["decode"] and sections["layer prefill"]["layer_prefill"]
    report = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Targets", "## Kernels against the naive recurrence", "## Decoding step", "## remote code"):
        assert heading in report


def test_a_wrong_kernel_fails_its_check(gpu_check):
    report = gpu_check.Report(budget_s=60)
    exact = torch.randn(1000)
    assert report.check("k", "exact", {"o": gpu_check.rel_rms(exact, exact)}, 1e-5)
    off = exact * (1 + 1e-3 * torch.randn(1000))
    assert not report.check("k", "off by 1e-3", {"o": gpu_check.rel_rms(off, exact)}, 1e-5)
    nan = exact.clone()
    nan[3] = float("nan")
    assert gpu_check.rel_rms(nan, exact) == float("inf")
    assert report.failed


def test_a_failing_section_is_recorded_and_the_next_runs(gpu_check):
    report = gpu_check.Report(budget_s=60)
    with report.section("broken") as entry:
        entry["before"] = 1
        raise RuntimeError("kernel launch failed")
    with report.section("next") as entry:
        entry["ran"] = True
    assert "RuntimeError: kernel launch failed" in report.errors["broken"]
    assert report.sections["next"]["ran"]
    spent = gpu_check.Report(budget_s=0)
    with spent.section("late") as entry:
        assert entry is None
    assert "time budget" in spent.errors["late"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_it_asks_for_the_dry_run(gpu_check, capsys):
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "--dry" in capsys.readouterr().err
