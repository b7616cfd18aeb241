"""Greedy parity of the vLLM plugin with the Transformers model, token for token.

The same prompts (token ids of real text: short, longer than the 64-token window, longer than 2k) get 32 greedy
tokens from `DSLALlamaForCausalLM` (one request at a time, with its cache) and from vLLM serving the checkpoint with
the plugin (all requests at once: concurrent requests of different lengths, prefill chunks of 512 tokens batched
with decodes), at each DSLA ratio. Run it from the project's environment: it runs the Transformers side here and
the vLLM side with the vLLM environment's Python (``make vllm-setup``), then compares and writes a JSON report.

    python benchmarks/vllm_parity.py --model dsla_demo/checkpoint --ratios 0 0.25 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LENGTHS = (24, 150, 700, 2300)  # short, past the window, a page, past 2k
MAX_TOKENS = 32


def prompt_ids(tokenizer, lengths=LENGTHS) -> list[list[int]]:
    """Token ids of CPython's pydoc topics, one slice per length, each from a different place."""
    from dsla_hf.data import pydoc_text

    ids = tokenizer(pydoc_text())["input_ids"]
    prompts, start = [], 0
    for n in lengths:
        if start + n > len(ids):
            raise ValueError(f"the text has {len(ids)} tokens, too few for prompts of {lengths}")
        prompts.append(ids[start : start + n])
        start += n
    return prompts


def transformers_tokens(model, ratios: list[float], prompts: list[list[int]]) -> dict[str, list]:
    import torch

    out = {}
    with torch.no_grad():
        for ratio in ratios:
            model.set_dsla_layers(ratio)
            rows = []
            for ids in prompts:
                x = torch.tensor([ids])
                y = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)  # fmt: skip
                rows.append(y[0, len(ids) :].tolist())
            out[str(ratio)] = rows
    return out


def vllm_tokens(model_dir: str, ratios: list[float], prompts: list[list[int]]) -> dict[str, list]:
    """(In the vLLM environment.) Every prompt at once, per ratio, one engine each."""
    import gc

    from vllm import LLM, SamplingParams

    out = {}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for ratio in ratios:
        llm = LLM(model_dir, dtype="float32", max_model_len=4096, hf_overrides={"dsla_ratio": ratio},
                  enforce_eager=True, max_num_seqs=len(prompts), kv_cache_memory_bytes=1 << 30,
                  max_num_batched_tokens=512, enable_prefix_caching=False, seed=0)  # fmt: skip
        results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        out[str(ratio)] = [list(r.outputs[0].token_ids) for r in results]
        del llm
        gc.collect()
    return out


def compare(reference: dict[str, list], got: dict[str, list], prompts: list[list[int]]) -> list[dict]:
    rows = []
    for ratio, want_rows in reference.items():
        for ids, want, have in zip(prompts, want_rows, got[ratio]):
            same = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), len(want))
            rows.append(dict(ratio=float(ratio), prompt_tokens=len(ids), equal=want == have, first_difference=same))
    return rows


def run(model_dir: str, ratios: list[float], vllm_python: str | Path = VLLM_PYTHON) -> dict:
    """Both sides and their comparison (raises where the vLLM environment is missing)."""
    from dsla_hf.loading import load_dsla

    if not Path(vllm_python).is_file():
        raise FileNotFoundError(f"no vLLM environment at {vllm_python}: run `make vllm-setup`")
    model, tokenizer, _ = load_dsla(model_dir)
    prompts = prompt_ids(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(dict(model=model_dir, ratios=ratios, prompts=prompts)))
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        subprocess.run([str(vllm_python), __file__, "--vllm-job", str(job)], check=True, env=env, timeout=1800)
        got = json.loads(job.with_suffix(".out.json").read_text())
    reference = transformers_tokens(model.eval(), ratios, prompts)
    import torch
    from machine import machine

    return dict(model=model_dir, max_tokens=MAX_TOKENS, machine=machine(torch.get_num_threads()),
                rows=compare(reference, got, prompts), transformers=reference, vllm=got)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "dsla_demo" / "checkpoint"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm" / "parity.json"))
    parser.add_argument("--vllm-job", help=argparse.SUPPRESS)  # the vLLM side, run by the vLLM environment
    args = parser.parse_args()
    if args.vllm_job:
        job = json.loads(Path(args.vllm_job).read_text())
        result = vllm_tokens(job["model"], job["ratios"], job["prompts"])
        Path(args.vllm_job).with_suffix(".out.json").write_text(json.dumps(result))
        return
    report = run(args.model, args.ratios, args.vllm_python)
    for row in report["rows"]:
        print(f"ratio {row['ratio']:.2f}  prompt {row['prompt_tokens']:5d} tokens: "
              + ("equal" if row["equal"] else f"differs from token {row['first_difference']}"))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    sys.exit(0 if all(r["equal"] for r in report["rows"]) else 1)


if __name__ == "__main__":
    main()
