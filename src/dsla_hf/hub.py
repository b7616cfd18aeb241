"""Publishing DSLA checkpoints: a complete Hub repository folder (safetensors weights, config with `auto_map`,
self-contained remote code, tokenizer, generation config, model card) and its upload with `huggingface_hub`.

The model card is rendered from a template in `dsla_hf.hub_cards` through `huggingface_hub.ModelCard`; what goes
into it is explicit in `CardInputs` (evaluation results, training metrics, base model, licence, datasets), which
`discover_inputs` fills from the files the demo and `dsla distill` write (`results.json`, `chain.json`).

    dsla push MODEL_DIR REPO_ID [--private] [--dry-run OUT_DIR] [--token-env NAME]

The token comes from huggingface_hub's normal resolution (`HF_TOKEN`, then the `hf auth login` store) or from the
environment variable named by `--token-env`; it is never printed or logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Teachers we recognise from their architecture alone (a saved DSLA config does not remember the teacher's name).
KNOWN_TEACHERS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "license": "apache-2.0",
        "language": ["en"],
        "shape": dict(
            num_hidden_layers=30,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
        ),
    },
}
DEFAULT_TAGS = ["dsla", "linear-attention", "hybrid-attention", "distillation", "llama", "custom_code"]
CARD_RATIOS = tuple(k / 8 for k in range(1, 9))
TRAINING_METRICS_FILE = "chain.json"
RESULTS_FILE = "results.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_TRUE = {"1", "ON", "YES", "TRUE"}


class PublishError(RuntimeError):
    """A clear, user-facing reason why a checkpoint cannot be published."""


# --- what goes into the card ---------------------------------------------------------------------------------


@dataclass
class EvalEntry:
    """One evaluation result: `metric` (e.g. "perplexity", "passkey_accuracy") of the model at a conversion `ratio`
    (0.0 is the teacher) on `dataset` (a short id; `dataset_name` is the readable name)."""

    ratio: float
    metric: str
    value: float
    dataset: str
    dataset_name: str | None = None
    split: str | None = None
    label: str | None = None  # e.g. "DSLA 25%"; derived from the ratio when absent


@dataclass
class CardInputs:
    """Everything the model card says beyond the model's own config. All optional: absent results are omitted."""

    repo_id: str | None = None
    base_model: str | None = None  # the teacher's Hub id; recognised from the architecture when None
    license: str | None = None  # the teacher's licence; from KNOWN_TEACHERS when None
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids used for training (metadata)
    language: list[str] | None = None
    tags: list[str] = field(default_factory=list)  # added to DEFAULT_TAGS
    evaluations: list[EvalEntry] = field(default_factory=list)
    training: dict | None = None  # the chain metrics (`chain.json` of `dsla distill` / the demo)
    seq_len: int | None = None  # training sequence length, for the token budget
    training_data: str | None = None  # free text describing the training and held-out text
    ratios: tuple[float, ...] = CARD_RATIOS
    title: str | None = None
    notes: str | None = None  # extra markdown for the limitations section


def evaluations_from_results(results: dict, num_layers: int) -> list[EvalEntry]:
    """Evaluation entries from a results JSON: the demo's `results.json` (`models` -> name -> `dsla_layers`,
    `heldout`/`ood` perplexity, `passkey` accuracy) or a plain `{"evaluations": [{ratio, metric, value, dataset,
    ...}]}` list."""
    entries = [EvalEntry(**row) for row in results.get("evaluations", [])]
    sources = results.get("sources") or {}
    for label, model in (results.get("models") or {}).items():
        ratio = len(model.get("dsla_layers") or []) / num_layers
        for key, default_name in (("heldout", "held-out text"), ("ood", "out-of-domain text")):
            ppl = (model.get(key) or {}).get("ppl")
            if ppl is not None and math.isfinite(ppl):
                source = sources.get(key) or key
                entries.append(
                    EvalEntry(
                        ratio, "perplexity", float(ppl), str(source), f"{source} ({default_name})", "test", label
                    )
                )
        passkey = model.get("passkey") or {}
        if passkey.get("accuracy") is not None:
            entries.append(
                EvalEntry(
                    ratio, "passkey_accuracy", float(passkey["accuracy"]), "passkey", "Passkey retrieval", None, label
                )
            )
        for length, accuracy in (passkey.get("per_length") or {}).items():
            name = f"Passkey retrieval ({length} tokens)"
            entries.append(
                EvalEntry(ratio, "passkey_accuracy", float(accuracy), f"passkey-{length}", name, None, label)
            )
    return entries


def discover_inputs(
    model_dir: str | Path, results: str | Path | None = None, training: str | Path | None = None, **overrides
) -> CardInputs:
    """`CardInputs` for a checkpoint folder: the training metrics (`chain.json` in the folder) and the results
    (`results.json` in the folder or its parent, as the demo writes them) when present, or the given files."""
    model_dir = Path(model_dir)
    inputs = CardInputs(**overrides)
    training_path = Path(training) if training else model_dir / TRAINING_METRICS_FILE
    if training_path.is_file():
        inputs.training = json.loads(training_path.read_text())
        logger.info("training metrics from %s", training_path)
    elif training:
        raise PublishError(f"No training metrics file {training_path}")
    if results:
        results_path = Path(results)
        if not results_path.is_file():
            raise PublishError(f"No results file {results_path}")
    else:
        candidates = [model_dir / RESULTS_FILE, model_dir.parent / RESULTS_FILE]
        results_path = next((p for p in candidates if p.is_file()), None)
    if results_path is not None:
        data = json.loads(results_path.read_text())
        num_layers = _config_value(model_dir, "num_hidden_layers")
        inputs.evaluations += evaluations_from_results(data, num_layers)
        if inputs.seq_len is None and isinstance(data.get("seq_len"), int):
            inputs.seq_len = data["seq_len"]
        sources = data.get("sources") or {}
        if inputs.training_data is None and sources:
            train = sources.get("train")
            train = ", ".join(train) if isinstance(train, list) else train
            parts = [
                f"trained on {train}" if train else None,
                f"held out: {sources['heldout']}" if sources.get("heldout") else None,
            ]
            parts.append(f"out of domain: {sources['ood']}" if sources.get("ood") else None)
            inputs.training_data = "; ".join(p for p in parts if p)
        logger.info("evaluation results from %s", results_path)
    return inputs


def _config_value(model_dir: Path, key: str):
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise PublishError(f"{model_dir} has no config.json: not a saved model folder")
    return json.loads(config_file.read_text())[key]


def infer_teacher(config) -> str | None:
    """The Hub id of a known teacher with this architecture, if any."""
    for repo_id, info in KNOWN_TEACHERS.items():
        if all(getattr(config, key, None) == value for key, value in info["shape"].items()):
            return repo_id
    return None


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g} %"


def _layers(indices) -> str:
    return ", ".join(str(i) for i in indices) if indices else "none"


def _label(entry: EvalEntry) -> str:
    if entry.label:
        return entry.label
    return "teacher" if entry.ratio == 0 else f"DSLA {100 * entry.ratio:g}%"


def _metric_title(metric: str) -> str:
    return {"perplexity": "Perplexity", "passkey_accuracy": "Passkey accuracy"}.get(metric, metric.replace("_", " "))


def _format_value(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tokens(count: int | None) -> str:
    if count is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def trained_layers(training: dict | None) -> set[int] | None:
    if not training:
        return None
    return {int(stage["layer"]) for stage in training.get("stages", [])}


def conversion_rows(config, ratios=CARD_RATIOS, trained: set[int] | None = None) -> list[dict]:
    """One row per ratio the checkpoint supports (0 = the teacher): which layers run as DSLA, which remain softmax."""
    from .models.dsla.configuration_dsla import ratio_to_layers

    n = config.num_hidden_layers
    rows, seen = [], set()
    for ratio in sorted({0.0, *ratios}):
        count = ratio_to_layers(ratio, n)
        if count > len(config.conversion_order) or count in seen:
            continue  # more layers than have DSLA weights, or the same layers as a smaller ratio
        seen.add(count)
        dsla = sorted(config.conversion_order[:count])
        distilled = "-" if not dsla else ("yes" if trained is not None and set(dsla) <= trained else "no")
        rows.append(
            dict(
                ratio=_pct(ratio),
                value=ratio,
                count=count,
                dsla=_layers(dsla),
                softmax=_layers([i for i in range(n) if i not in dsla]),
                distilled=distilled,
            )
        )
    return rows


def training_summary(training: dict | None, seq_len: int | None = None) -> dict | None:
    """Recipe and token budget of a chained distillation from its metrics (`chain.json`)."""
    if not training:
        return None
    config = training.get("config") or {}
    seq_len = seq_len or training.get("seq_len")
    stages, total_tokens, total_seqs = [], 0, 0
    for stage in training.get("stages", []):
        seqs = 0
        if stage.get("layer_alone"):
            seqs += int(stage["layer_alone"].get("steps") or 0) * int(config.get("layer_alone_batch") or 1)
        if stage.get("distill"):
            seqs += int(stage["distill"].get("steps") or 0) * int(config.get("distill_batch") or 1)
        total_seqs += seqs
        tokens = seqs * seq_len if seq_len else None
        total_tokens += tokens or 0
        ppl = (stage.get("eval") or {}).get("ppl")
        stages.append(
            dict(
                stage=int(stage["stage"]) + 1,
                layer=stage["layer"],
                ratio=_pct(stage["ratio"]),
                tokens=_tokens(tokens) if seq_len else f"{seqs} sequences",
                ppl=f"{ppl:.3f}" if ppl is not None else "-",
                ppl_ratio=f"{stage['ppl_ratio']:.3f}x" if stage.get("ppl_ratio") is not None else "-",
            )
        )
    recipe = [("Stages (layers distilled)", str(len(stages)))]
    if config.get("layer_alone_steps"):
        recipe.append(
            (
                "Layer-alone stage",
                f"{config['layer_alone_steps']} steps per layer, batch {config.get('layer_alone_batch')}, "
                f"lr {config.get('layer_alone_lr')}, teacher-forced on {config.get('capture_sequences')} captured "
                f"sequences (capture: {config.get('capture', 'chain')})",
            )
        )
    if config.get("distill_steps"):
        recipe.append(
            (
                "Distillation stage",
                f"{config['distill_steps']} steps per layer, batch {config.get('distill_batch')}, lr "
                f"{config.get('distill_lr')}; loss weights: alignment {config.get('alignment_weight')} "
                f"({config.get('alignment_target')}), KL {config.get('kl_weight')}, CE {config.get('ce_weight')}, "
                f"gate divergence {config.get('gate_divergence_weight')}",
            )
        )
    if seq_len:
        recipe.append(("Sequence length", str(seq_len)))
        recipe.append(("Token budget (trained tokens, all stages)", f"{_tokens(total_tokens)} ({total_tokens:,})"))
    else:
        recipe.append(("Training budget (all stages)", f"{total_seqs} sequences"))
    teacher = training.get("teacher") or {}
    if teacher.get("ppl") is not None:
        recipe.append(("Teacher held-out perplexity", f"{teacher['ppl']:.3f}"))
    if training.get("stopped"):
        recipe.append(("Stopped", str(training["stopped"])))
    return {"recipe": recipe, "stages": stages, "tokens": total_tokens if seq_len else None}


def eval_results(entries: list[EvalEntry]):
    """`huggingface_hub.EvalResult`s for the card's `model-index`, one per entry, the ratio in the metric name."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=e.dataset,
            dataset_name=e.dataset_name or e.dataset,
            dataset_split=e.split,
            metric_type=e.metric,
            metric_name=f"{_metric_title(e.metric)} ({_label(e)})",
            metric_config=f"dsla_ratio={e.ratio:g}",
            metric_value=e.value,
        )
        for e in entries
    ]


def card_data(config, inputs: CardInputs):
    """The card's metadata (`ModelCardData`): base model, licence, pipeline, library, tags, datasets, model-index."""
    from huggingface_hub import ModelCardData

    base_model = inputs.base_model or infer_teacher(config)
    teacher = KNOWN_TEACHERS.get(base_model or "", {})
    tags = list(dict.fromkeys(DEFAULT_TAGS + list(inputs.tags)))
    name = (inputs.repo_id or "dsla-model").split("/")[-1]
    return ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        license=inputs.license or teacher.get("license"),
        language=inputs.language or teacher.get("language"),
        datasets=list(inputs.datasets) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=name,
        eval_results=eval_results(inputs.evaluations) or None,
    )


def render_model_card(config, inputs: CardInputs | None = None, template: str | Path | None = None):
    """Render the model card (`huggingface_hub.ModelCard`) of a DSLA model from its config and `inputs`."""
    from huggingface_hub import ModelCard

    from .hub_cards import template_path

    inputs = inputs or CardInputs()
    data = card_data(config, inputs)
    trained = trained_layers(inputs.training)
    rows = conversion_rows(config, inputs.ratios, trained)
    example = next((r for r in rows if r["value"] == 0.25), rows[1] if len(rows) > 1 else rows[0])
    default_layers = config.active_dsla_layers
    default_summary = (
        f"{len(default_layers)} DSLA layers ({_pct(len(default_layers) / config.num_hidden_layers)}): "
        f"{_layers(default_layers)}"
        if default_layers
        else "none (every layer softmax attention, the teacher)"
    )
    options = (
        "dsla_feature_map",
        "dsla_normalizer",
        "dsla_gate_source",
        "dsla_mixing",
        "dsla_lora_rank",
        "dsla_window",
    )
    eval_rows = [
        dict(
            label=_label(e),
            ratio=_pct(e.ratio),
            metric=_metric_title(e.metric),
            dataset=e.dataset_name or e.dataset,
            value=_format_value(e.value),
        )
        for e in sorted(inputs.evaluations, key=lambda e: (e.metric, e.dataset, e.ratio))
    ]
    title = inputs.title or (
        f"{(data.base_model or 'Llama').split('/')[-1]} with DSLA (dual-state linear attention)"
        if not inputs.repo_id
        else inputs.repo_id.split("/")[-1]
    )
    return ModelCard.from_template(
        data,
        template_path=str(template or template_path()),
        title=title,
        model_id=inputs.repo_id or "path/to/this/folder",
        num_layers=config.num_hidden_layers,
        dsla_count=len(config.dsla_layers),
        dsla_preset=config.dsla_preset,
        dsla_options=", ".join(f"`{k.removeprefix('dsla_')}={getattr(config, k)}`" for k in options),
        dsla_layers=_layers(config.dsla_layers),
        conversion_order=_layers(config.conversion_order),
        default_summary=default_summary,
        foldable=config.foldable,
        conversion_rows=rows,
        any_trained=None if trained is None else bool(trained),
        trained_count=len(trained or ()),
        eval_rows=eval_rows,
        eval_notes=inputs.training_data and f"Data: {inputs.training_data}.",
        training=training_summary(inputs.training, inputs.seq_len),
        example_ratio=f"{example['value']:g}",
        example_count=example["count"],
        example_layers=f"[{', '.join(str(i) for i in config.conversion_order[:2])}]",
        notes=inputs.notes,
        seq_len=inputs.seq_len or (inputs.training or {}).get("seq_len"),
    )


# --- the repository folder ---------------------------------------------------------------------------------------


def _load(model_or_dir):
    """A DSLA model object from a model or a saved folder, and the folder it came from (or None)."""
    from .models.dsla.modeling_dsla import DSLALlamaForCausalLM

    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        if not (folder / "config.json").is_file():
            raise PublishError(f"{folder} has no config.json: not a saved model folder")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "dsla_llama":
            raise PublishError(f"{folder} holds a {model_type!r} model, not a DSLA model (model_type 'dsla_llama')")
        return DSLALlamaForCausalLM.from_pretrained(folder, dtype="auto"), folder
    if not isinstance(model_or_dir, DSLALlamaForCausalLM):
        raise PublishError(f"Expected a DSLALlamaForCausalLM or a folder, got {type(model_or_dir).__name__}")
    return model_or_dir, None


def _load_tokenizer(tokenizer, folder: Path | None):
    from transformers import AutoTokenizer

    if tokenizer is None and folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = folder
    if tokenizer is None:
        raise PublishError("No tokenizer: pass one (or its folder), or publish a folder that has its tokenizer files")
    if isinstance(tokenizer, (str, Path)):
        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def build_repo_folder(
    model_or_dir,
    out_dir: str | Path,
    *,
    tokenizer=None,
    inputs: CardInputs | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str | Path] | None = None,
) -> Path:
    """Write a complete Hub repository folder for a DSLA model (an object or a saved folder) into `out_dir`:
    safetensors weights, config with `auto_map`, self-contained remote code, tokenizer, generation config, the
    model card (`README.md`) and the training / evaluation JSON files the card was made from. Returns `out_dir`.

    `inputs` defaults to `discover_inputs(folder)` for a folder (its `chain.json` and `results.json`) and to an
    empty `CardInputs` for a model object."""
    model, folder = _load(model_or_dir)
    tokenizer = _load_tokenizer(tokenizer, folder)
    if inputs is None:
        inputs = discover_inputs(folder) if folder is not None else CardInputs()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if folder is not None and out.resolve() == folder.resolve():
            raise PublishError("The repository folder must not be the model folder itself")
        if not overwrite:
            raise PublishError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)
    if inputs.training is not None:
        (out / TRAINING_METRICS_FILE).write_text(json.dumps(inputs.training, indent=2))
    if inputs.evaluations:
        rows = [vars(e) for e in inputs.evaluations]
        (out / "eval_results.json").write_text(json.dumps({"evaluations": rows}, indent=2))
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, out / name)
    card = render_model_card(model.config, inputs)
    card.save(out / "README.md")
    check_repo_folder(out)
    return out


REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "README.md",
    "modeling_dsla.py",
    "configuration_dsla.py",
    "dsla_kernels.py",
    "tokenizer_config.json",
)


def check_repo_folder(folder: str | Path) -> None:
    """Raise `PublishError` unless `folder` is a complete DSLA repository (weights as safetensors, remote code and
    its `auto_map`, tokenizer, generation config, card)."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        missing.append("(no pickled weights)")
    if missing:
        raise PublishError(f"{folder} is not a complete repository folder: missing {missing}")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    if "AutoModelForCausalLM" not in auto_map:
        raise PublishError(f"{folder}/config.json has no auto_map for AutoModelForCausalLM")


# --- upload ----------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def resolve_token(token: str | None = None, token_env: str | None = None) -> str:
    """The write token: `token`, else the variable named `token_env`, else huggingface_hub's resolution
    (`HF_TOKEN`, then the token stored by `hf auth login`). Error messages never contain the token."""
    from huggingface_hub import get_token

    if token:
        return token
    if token_env:
        value = os.environ.get(token_env)
        if not value:
            raise PublishError(f"The environment variable {token_env} (--token-env) is not set or empty")
        return value.strip()
    value = get_token()
    if not value:
        raise PublishError("No Hugging Face token: set HF_TOKEN, or log in with `hf auth login`")
    return value


def push_to_hub(
    model_or_dir,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    token_env: str | None = None,
    tokenizer=None,
    inputs: CardInputs | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload DSLA checkpoint",
    work_dir: str | Path | None = None,
):
    """Build the repository folder of a DSLA model and upload it: `create_repo` (private or public; an existing
    repo keeps its visibility) then `upload_folder`. Returns huggingface_hub's `CommitInfo`.

    Fails with a clear `PublishError` before any request in offline mode (`HF_HUB_OFFLINE=1`) or without a token."""
    from huggingface_hub import HfApi

    if hub_offline():
        raise PublishError(
            "Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1): cannot push. Unset it, or use --dry-run OUT_DIR "
            "to write the repository folder only."
        )
    secret = resolve_token(token, token_env)
    if inputs is not None and inputs.repo_id is None:
        inputs.repo_id = repo_id
    with tempfile.TemporaryDirectory(prefix="dsla-push-") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp) / "repo"  # work_dir: kept, must be empty
        if inputs is None:
            is_dir = isinstance(model_or_dir, (str, Path))
            inputs = discover_inputs(model_or_dir, repo_id=repo_id) if is_dir else CardInputs(repo_id=repo_id)
        build_repo_folder(model_or_dir, folder, tokenizer=tokenizer, inputs=inputs)
        api = HfApi(endpoint=endpoint, token=secret)
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        logger.info("repository %s ready", url)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
        )
    return info
