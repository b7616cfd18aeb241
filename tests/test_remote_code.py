"""Saved folders carry self-contained remote code: they load with trust_remote_code in a fresh process that cannot
import dsla_hf, and without trust_remote_code where dsla_hf is installed."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

from dsla_hf import DSLALlamaForCausalLM, convert_llama_to_dsla

# Runs in a fresh interpreter where `import dsla_hf` fails, as on a machine that never installed it.
LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dsla_hf" or name.startswith("dsla_hf."):
                raise ImportError("dsla_hf is blocked in this test")

    sys.meta_path.insert(0, Block())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "dsla_hf" not in sys.modules
    ids = load_file(folder + "/probe.safetensors")["ids"]
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.set_dsla_layers([])
        teacher_logits = model(ids).logits
    save_file({"logits": logits, "generated": generated, "teacher": teacher_logits}, out)
    print(type(model).__module__)

    # The folder's own Triton kernels (TRITON_INTERPRET=1: on CPU tensors) against its naive recurrence.
    package = type(model).__module__.rpartition(".")[0]
    kernels = importlib.import_module(package + ".dsla_kernels")
    dispatch = importlib.import_module(package + ".dispatch")
    assert dispatch.triton_available()  # so CUDA tensors would take the Triton kernels
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 21, 2, 8), torch.randn(1, 21, 2, 8), torch.randn(1, 21, 2, 8)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 21, 2, 2, 8) + 3)  # [B, T, S, HK, K]
    o, state = kernels.chunk_dsla(q, k, v, g, output_final_state=True, backend="triton")
    o_ref, state_ref = kernels.naive_dsla(q, k, v, g, output_final_state=True)
    assert torch.allclose(o, o_ref, atol=1e-4) and torch.allclose(state, state_ref, atol=1e-4)
    print("triton from the folder:", sys.modules[package + ".triton_chunk"].__name__)
    """
)


def test_saved_folder_loads_as_remote_code_without_dsla_hf(tiny_teacher, tmp_path):
    model = convert_llama_to_dsla(tiny_teacher, layers=[1, 2], conversion_order=[2, 1]).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dsla.DSLALlamaForCausalLM"
    for name in ("modeling_dsla.py", "configuration_dsla.py", "cache_dsla.py", "dsla_kernels.py", "triton_chunk.py"):
        assert (folder / name).is_file(), name
    ids = torch.randint(3, 101, (1, 19))
    save_file({"ids": ids}, str(folder / "probe.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_PACKAGE)
    env = dict(
        os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="", TRITON_INTERPRET="1"
    )
    out = tmp_path / "out.safetensors"
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(out)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith("transformers_modules"), run.stdout
    assert "triton from the folder: transformers_modules." in run.stdout
    # It says once which kernels it runs, and why not the C++ ones.
    assert run.stderr.count("DSLA layers on cpu run the PyTorch path") == 1, run.stderr[-2000:]
    assert "not with remote code" in run.stderr
    result = load_file(str(out))
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        teacher = tiny_teacher(ids).logits
    assert torch.allclose(result["logits"], expected, atol=1e-5)
    assert torch.equal(result["generated"], generated)
    assert torch.allclose(result["teacher"], teacher, atol=1e-5)


def test_register_for_auto_class_and_local_load_without_trust_remote_code(tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    model = convert_llama_to_dsla(tiny_teacher, layers=[0]).eval()
    DSLALlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        model.save_pretrained(tmp_path)
    finally:
        DSLALlamaForCausalLM._auto_class = None
    assert (tmp_path / "dsla_kernels.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # dsla_hf is installed: no remote code needed
    assert type(loaded) is DSLALlamaForCausalLM


def test_remote_model_saves_itself_again(tiny_teacher, tmp_path):
    """A model loaded as remote code re-exports the same flat files when saved."""
    model = convert_llama_to_dsla(tiny_teacher, layers=[3]).eval()
    model.save_pretrained(tmp_path / "a")
    script = tmp_path / "resave.py"
    script.write_text(
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "m.save_pretrained(sys.argv[2])\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("modeling_dsla.py", "dsla_kernels.py", "naive.py"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()
