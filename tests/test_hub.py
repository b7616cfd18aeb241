"""Publishing (`dsla_hf.hub`, `dsla push`): the repository folder, the model card, the upload with the real
huggingface_hub client against a loopback stand-in of the Hub, and loading what was uploaded in fresh processes
(remote code without dsla_hf, dsla_hf without remote code, a cached repo id offline). No network."""

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dsla_hf import cli, convert_llama_to_dsla
from dsla_hf.commands import push
from dsla_hf.hub import (
    CardInputs,
    EvalEntry,
    PublishError,
    build_repo_folder,
    discover_inputs,
    evaluations_from_results,
    push_to_hub,
    render_model_card,
)
from tests.hub_stub import HubStub

REPO_ID = "dsla-org/tiny-dsla"
TOKEN = "hf_StubSecretToken0123456789abcdefXYZ"
ORDER = [2, 0, 3, 1]


def dsla_push(argv: list[str]) -> int:
    """`dsla push ARGV`, parsed by the sub-command's own parser (the other sub-commands are not imported)."""
    parser = argparse.ArgumentParser(prog="dsla push")
    push.add_arguments(parser)
    return push.run(parser.parse_args(argv))


def test_push_is_a_dsla_subcommand():
    assert cli.COMMANDS["push"][0] == "dsla_hf.commands.push"


def tiny_tokenizer(folder: Path):
    """A word-level tokenizer with the tiny model's 101 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, 100)}, "<unk>": 100}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


CHAIN = {
    "conversion_order": ORDER,
    "num_layers": 4,
    "teacher": {"loss": 4.6, "ppl": 99.5, "tokens": 1000},
    "config": {
        "target_ratio": 0.5,
        "layer_alone_steps": 20,
        "layer_alone_lr": 0.003,
        "layer_alone_batch": 2,
        "capture_sequences": 8,
        "capture": "teacher",
        "distill_steps": 5,
        "distill_batch": 1,
        "distill_lr": 0.001,
        "alignment_weight": 1.0,
        "kl_weight": 1.0,
        "ce_weight": 0.0,
        "gate_divergence_weight": 0.01,
        "alignment_target": "attention",
    },
    "stages": [
        {
            "stage": 0,
            "layer": 2,
            "dsla_layers": [2],
            "ratio": 0.25,
            "layer_alone": {"steps": 20},
            "distill": {"steps": 5},
            "eval": {"ppl": 101.0},
            "ppl_ratio": 1.015,
        },
        {
            "stage": 1,
            "layer": 0,
            "dsla_layers": [0, 2],
            "ratio": 0.5,
            "layer_alone": {"steps": 20},
            "distill": {"steps": 5},
            "eval": {"ppl": 104.0},
            "ppl_ratio": 1.045,
        },
    ],  # fmt: skip
    "stopped": "target ratio 0.5 reached",
}
RESULTS = {  # the demo's results.json, abridged
    "teacher": "SmolLM2-135M-Instruct",
    "sources": {"train": ["python-docs", "linux-docs"], "heldout": "postgresql-docs", "ood": None},
    "seq_len": 64,
    "models": {
        "teacher": {"dsla_layers": [], "heldout": {"ppl": 99.5},
                    "passkey": {"accuracy": 1.0, "per_length": {"256": 1.0}}},
        "DSLA 25%": {"dsla_layers": [2], "heldout": {"ppl": 101.0},
                     "passkey": {"accuracy": 0.5, "per_length": {"256": 0.5}}},
        "DSLA 50%": {"dsla_layers": [0, 2], "heldout": {"ppl": 104.0}},
    },
}  # fmt: skip


@pytest.fixture
def checkpoint(tiny_teacher, tmp_path):
    """A chain-style output folder: `out/checkpoint` (model, tokenizer, chain.json) and `out/results.json`."""
    model = convert_llama_to_dsla(tiny_teacher, layers="all", conversion_order=ORDER, active=0.5).eval()
    folder = tmp_path / "out" / "checkpoint"
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    (folder / "chain.json").write_text(json.dumps(CHAIN))
    (tmp_path / "out" / "results.json").write_text(json.dumps(RESULTS))
    return model, folder


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online (as far as huggingface_hub knows), Xet off (the stub speaks LFS), no stored token, HF_TOKEN set."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    # Nothing may leave this machine: requests without an explicit endpoint go to a closed local port, and the
    # client's agent-registry lookup (a GET to the default endpoint) is answered with its own empty registry.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return monkeypatch


# --- the model card ----------------------------------------------------------------------------------------------


def test_model_card_round_trips(checkpoint, tmp_path):
    from huggingface_hub import ModelCard

    model, _ = checkpoint
    inputs = CardInputs(
        repo_id=REPO_ID,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets=["some-org/python-docs"],
        evaluations=evaluations_from_results(RESULTS, 4),
        training=CHAIN,
        seq_len=64,
    )
    card = render_model_card(model.config, inputs)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.eval_results == card.data.eval_results
    assert loaded.text == card.text
    data = loaded.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.license == "apache-2.0"  # the teacher's
    assert data.pipeline_tag == "text-generation" and data.library_name == "transformers"
    assert {"dsla", "linear-attention", "distillation", "custom_code"} <= set(data.tags)
    assert data.datasets == ["some-org/python-docs"]
    ppl = {r.metric_name: r.metric_value for r in data.eval_results if r.metric_type == "perplexity"}
    assert ppl == {"Perplexity (teacher)": 99.5, "Perplexity (DSLA 25%)": 101.0, "Perplexity (DSLA 50%)": 104.0}
    passkey = [r for r in data.eval_results if r.metric_type == "passkey_accuracy" and r.dataset_type == "passkey"]
    assert {r.metric_config: r.metric_value for r in passkey} == {"dsla_ratio=0": 1.0, "dsla_ratio=0.25": 0.5}
    text = loaded.text
    assert "Conversion order (first converted first) | 2, 0, 3, 1 |" in text
    # which layers remain softmax at each ratio, and whether that ratio was distilled
    assert "| 25 % | 1 | 2 | 0, 1, 3 | yes |" in text
    assert "| 50 % | 2 | 0, 2 | 1, 3 | yes |" in text
    assert "| 75 % | 3 | 0, 2, 3 | 1 | no |" in text
    # recipe and token budget: 2 stages x (20 x 2 + 5 x 1) sequences x 64 tokens
    assert "5.76k (5,760)" in text and "20 steps per layer, batch 2" in text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "model.set_dsla_layers(0.25)" in text


def test_model_card_without_results_omits_them(checkpoint):
    model, _ = checkpoint
    card = render_model_card(model.config, CardInputs())
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert "## Evaluation" not in card.text and "## Training" not in card.text
    assert card.data.base_model is None  # a tiny random Llama is no known teacher
    assert "| 100 % | 4 | 0, 1, 2, 3 | none |" in card.text


def test_plain_evaluations_list_and_dataclass_inputs(checkpoint):
    model, _ = checkpoint
    rows = [{"ratio": 0.5, "metric": "perplexity", "value": 7.5, "dataset": "wikitext", "split": "test"}]
    entries = evaluations_from_results({"evaluations": rows}, 4)
    assert entries == [EvalEntry(0.5, "perplexity", 7.5, "wikitext", split="test")]
    card = render_model_card(model.config, CardInputs(evaluations=entries, license="mit"))
    assert card.data.license == "mit"
    assert card.data.eval_results[0].dataset_split == "test"
    assert "| DSLA 50% | 50 % | Perplexity | wikitext | 7.5 |" in card.text


# --- the repository folder ----------------------------------------------------------------------------------------


def test_dry_run_writes_a_complete_folder(checkpoint, tmp_path, capsys):
    _, folder = checkpoint
    out = tmp_path / "repo"
    assert dsla_push([str(folder), REPO_ID, "--dry-run", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json"}
    expected |= {"tokenizer_config.json", "modeling_dsla.py", "configuration_dsla.py", "dsla_kernels.py"}
    expected |= {"chain.json", "eval_results.json"}
    assert expected <= names, expected - names
    assert not any(name.endswith((".bin", ".pt", ".pyc")) for name in names)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dsla.DSLALlamaForCausalLM"
    assert config["conversion_order"] == ORDER
    card = (out / "README.md").read_text()
    assert "postgresql-docs" in card and "Perplexity (DSLA 25%)" in card  # discovered results.json beside
    # an existing folder is not silently replaced
    assert dsla_push([str(folder), REPO_ID, "--dry-run", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().out
    assert dsla_push([str(folder), REPO_ID, "--dry-run", str(out), "--overwrite"]) == 0


def test_build_from_model_object_needs_a_tokenizer(checkpoint, tmp_path):
    model, folder = checkpoint
    with pytest.raises(PublishError, match="No tokenizer"):
        build_repo_folder(model, tmp_path / "a")
    out = build_repo_folder(model, tmp_path / "b", tokenizer=folder)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(PublishError, match="not a DSLA model"):
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        build_repo_folder(tmp_path / "llama", tmp_path / "c")


# --- upload -------------------------------------------------------------------------------------------------------


def test_offline_mode_fails_before_any_request(checkpoint, hub_env, capsys):
    _, folder = checkpoint
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    with HubStub(TOKEN) as stub:
        code = dsla_push([str(folder), REPO_ID, "--endpoint", stub.endpoint])
        with pytest.raises(PublishError, match="offline mode"):
            push_to_hub(folder, REPO_ID, endpoint=stub.endpoint)
    assert code == 2
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in capsys.readouterr().out
    assert stub.requests == []


def test_missing_token_is_a_clear_error(checkpoint, hub_env, capsys):
    _, folder = checkpoint
    hub_env.delenv("HF_TOKEN")
    with HubStub(TOKEN) as stub:
        assert dsla_push([str(folder), REPO_ID, "--endpoint", stub.endpoint]) == 2
        assert "No Hugging Face token" in capsys.readouterr().out
        assert dsla_push([str(folder), REPO_ID, "--endpoint", stub.endpoint, "--token-env", "MY_HUB_KEY"]) == 2
        assert "MY_HUB_KEY (--token-env) is not set" in capsys.readouterr().out
    assert stub.requests == []


def test_rejected_token_is_a_clear_error_without_the_token(checkpoint, hub_env, capsys):
    _, folder = checkpoint
    wrong = "hf_WrongTokenButStillSecret987654321"
    hub_env.setenv("HF_TOKEN", wrong)
    with HubStub(TOKEN) as stub:
        assert dsla_push([str(folder), REPO_ID, "--endpoint", stub.endpoint]) == 1
    out = capsys.readouterr()
    assert "the Hub refused" in out.out and "401" in out.out
    assert wrong not in out.out + out.err and REPO_ID not in stub.repos


# Loads a repository in a fresh interpreter from each `key=source` argument (a folder, or a repo id huggingface_hub
# resolves from HF_HUB_CACHE offline) and saves the logits at the saved ratio and at 25 %. BLOCK=1 makes
# `import dsla_hf` fail as on a machine that never installed it (remote code, trust_remote_code=True); BLOCK=0 imports
# dsla_hf and loads without trust_remote_code.
LOAD_REPO = textwrap.dedent(
    """
    import importlib.abc, os, sys

    block = os.environ["BLOCK"] == "1"
    if block:
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "dsla_hf" or name.startswith("dsla_hf."):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, Block())
    else:
        import dsla_hf  # registers the Auto classes
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    TEXT = "w5 w7 w9"
    probe, out, *sources = sys.argv[1:]
    ids = load_file(probe)["ids"]
    kwargs = {"trust_remote_code": True} if block else {}
    results = {}
    for item in sources:
        key, source = item.split("=", 1)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        results[key + "_tokens"] = torch.tensor(tokenizer(TEXT).input_ids)
        results[key + "_eos"] = torch.tensor(model.generation_config.eos_token_id)
        with torch.no_grad():
            results[key] = model(ids).logits
            model.set_dsla_layers(0.25)
            results[key + "_25"] = model(ids).logits
        print(key, type(model).__module__, type(model).__name__)
    assert ("dsla_hf" in sys.modules) != block
    save_file(results, out)
    """
)


def _populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    """The layout of huggingface_hub's cache: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)


def _load_in_fresh_process(
    model, tokenizer, tmp_path: Path, block: bool, cache: Path, sources: dict[str, str], atol: float = 1e-5
) -> None:
    """Run LOAD_REPO offline and compare its logits, tokenizer and generation config with the original's."""
    ids = torch.randint(3, 100, (1, 17))
    probe = tmp_path / "probe.safetensors"
    save_file({"ids": ids}, str(probe))
    script = tmp_path / "load.py"
    script.write_text(LOAD_REPO)
    saved_layers = model.dsla_layers
    with torch.no_grad():
        expected = model(ids).logits
        model.set_dsla_layers(0.25)
        expected_25 = model(ids).logits
    model.set_dsla_layers(saved_layers)
    env = dict(
        os.environ,
        BLOCK="1" if block else "0",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / f"modules_{int(block)}"),
        PYTHONPATH="" if block else str(Path(__file__).resolve().parents[1] / "src"),
    )
    env.pop("HF_TOKEN", None)
    out = tmp_path / f"out_{int(block)}.safetensors"
    args = [f"{key}={source}" for key, source in sources.items()]
    run = subprocess.run(
        [sys.executable, str(script), str(probe), str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    module = "transformers_modules" if block else "dsla_hf.models.dsla.modeling_dsla"
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(sources), run.stdout
    assert all(line.split()[1].startswith(module) and line.endswith("DSLALlamaForCausalLM") for line in lines)
    result = load_file(str(out))
    for key in sources:
        assert torch.allclose(result[key], expected, atol=atol), key
        assert torch.allclose(result[key + "_25"], expected_25, atol=atol), key
        assert result[key + "_tokens"].tolist() == tokenizer("w5 w7 w9").input_ids, key
        assert result[key + "_eos"].tolist() == model.generation_config.eos_token_id, key


def test_push_to_loopback_hub_then_load_uploaded_repo(checkpoint, hub_env, tmp_path, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    model, folder = checkpoint
    inputs = discover_inputs(folder, repo_id=REPO_ID)
    reference = build_repo_folder(folder, tmp_path / "reference", inputs=inputs)  # what a dry run writes
    with HubStub(TOKEN) as stub:
        caplog.set_level(logging.DEBUG)
        hf_logging.set_verbosity_debug()
        try:
            code = dsla_push([str(folder), REPO_ID, "--private", "--endpoint", stub.endpoint])
        finally:
            hf_logging.set_verbosity_warning()
        assert code == 0
        # again into the existing repo, token from another variable: create_repo(exist_ok) gets 409, the commit goes on
        hub_env.delenv("HF_TOKEN")
        hub_env.setenv("MY_HUB_KEY", TOKEN)
        info = push_to_hub(folder, REPO_ID, token_env="MY_HUB_KEY", endpoint=stub.endpoint, commit_message="again")
    assert stub.errors == []
    assert stub.validated and "model-index" in stub.validated[0] and "base_model" not in stub.validated[0]
    captured = capfd.readouterr()
    assert f"pushed {folder} to {REPO_ID} (private)" in captured.out
    assert "Authorization" not in caplog.text
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text and TOKEN[3:15] not in text
    repo = stub.repos[REPO_ID]
    assert repo.private is True
    assert [c["summary"] for c in repo.commits] == ["Upload DSLA checkpoint", "again"]
    assert info.oid == repo.commits[-1]["oid"]
    requests = set(stub.requests)
    assert ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch") in requests  # the weights went through LFS
    assert any(method == "PUT" and path.startswith("/lfs/") for method, path in requests)
    assert ("POST", f"/api/models/{REPO_ID}/commit/main") in requests
    # the files received are exactly the repository folder of a dry run
    expected = {p.name: p.read_bytes() for p in reference.iterdir()}
    assert set(repo.files) == set(expected)
    for name, data in expected.items():
        assert repo.files[name] == data, name

    # what was received loads in fresh processes: from a folder with remote code where dsla_hf cannot be imported;
    # with dsla_hf installed and no trust_remote_code, from the folder and, offline, by repo id from the HF cache
    received = tmp_path / "received"
    for name, data in repo.files.items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(data)
    cache = tmp_path / "hf_cache"
    _populate_hub_cache(cache, REPO_ID, repo.files, repo.commits[-1]["oid"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _load_in_fresh_process(model, tokenizer, tmp_path, True, cache, {"folder": str(received)})
    _load_in_fresh_process(model, tokenizer, tmp_path, False, cache, {"folder": str(received), "cache": REPO_ID})


def test_cached_repo_loads_offline_with_remote_code_without_dsla_hf(checkpoint, tmp_path):
    model, folder = checkpoint
    repo = build_repo_folder(folder, tmp_path / "repo", inputs=discover_inputs(folder, repo_id=REPO_ID))
    files = {p.name: p.read_bytes() for p in repo.iterdir()}
    cache = tmp_path / "hf_cache"
    _populate_hub_cache(cache, REPO_ID, files, "0123456789abcdef0123456789abcdef01234567")
    _load_in_fresh_process(model, AutoTokenizer.from_pretrained(folder), tmp_path, True, cache, {"cache": REPO_ID})


@pytest.mark.slow
def test_embedded_smollm2_checkpoint_dry_run_and_reload(smollm2, tmp_path):
    """The embedded teacher converted to DSLA, `dsla push --dry-run`, reloaded with remote code without dsla_hf."""
    teacher, tokenizer = smollm2
    order = list(range(29, -1, -1))
    model = convert_llama_to_dsla(teacher, layers="all", conversion_order=order, active=0.25).eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    repo = tmp_path / "repo"
    assert dsla_push([str(folder), "someone/SmolLM2-135M-Instruct-DSLA", "--dry-run", str(repo)]) == 0
    card = (repo / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "| 25 % | 7 | 23, 24, 25, 26, 27, 28, 29 | " in card
    _load_in_fresh_process(model, tokenizer, tmp_path, True, tmp_path / "no_cache", {"folder": str(repo)}, atol=1e-4)
