"""Chained distillation (docs/design.md §3): convert layers one at a time in ranking order.

Stage k converts layer `order[k]`: its DSLA weights start from the teacher's attention (as `convert_llama_to_dsla`
initialises them), train with every earlier conversion in place (a layer-alone stage on captured inputs, then an
optional short `DSLADistillTrainer` phase on logits), and are then frozen. Held-out perplexity is measured after
every stage; the chain stops at a target ratio or when perplexity passes a quality floor. After every stage the model
is saved (safetensors, `save_pretrained`) with `chain.json` (every stage's metrics) beside it, so the chain resumes
from the last finished stage, and the one checkpoint serves every prefix: `model.set_dsla_layers(ratio)`.

    dsla distill --ratio 0.5 --output dsla_chain/        # or: accelerate launch --num_processes 2 --cpu -m ...

The settings are `ChainRecipe` (how every stage trains; a chain resumes only with the same) and `ChainConfig` (the
recipe plus where the chain runs and how far it goes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..distributed import barrier, is_main_process
from ..evaluation.metrics import perplexity
from ..models.dsla.configuration_dsla import ratio_to_layers
from .layer_alone import capture_all_layers, capture_layer_io, fit_layer_alone

CHAIN_FILE = "chain.json"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class ChainRecipe:
    """How every stage of a chain trains. Recorded in `chain.json`; a chain resumes only with the same recipe.
    `DemoRecipe` (dsla_hf.demo) extends it with the demo's data, ranking and layer options."""

    # layer-alone stage (teacher-forced on captured inputs)
    layer_alone_steps: int = 40
    layer_alone_lr: float = 3e-3
    layer_alone_batch: int = 2
    layer_alone_schedule: str = "constant"  # or "cosine" (decays to a tenth of the learning rate)
    capture_sequences: int = 8
    # "chain": capture each layer's inputs with the earlier conversions in place (a forward up to the layer per stage);
    # "teacher": one teacher pass captures every layer's inputs up front (LoLCATs-style, much cheaper)
    capture: str = "chain"
    # the TRL phase (DSLADistillTrainer: KL, alignment, gate divergence) after the layer-alone stage (0: skipped);
    # the loss settings pass on to `DSLADistillConfig` by name (`distill_settings`)
    distill_steps: int = 8
    distill_lr: float = 1e-3
    distill_batch: int = 1
    alignment_weight: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    gate_divergence_weight: float = 0.01
    alignment_target: str = "attention"
    seed: int = 0

    def replace(self, **changes) -> ChainRecipe:  # (a subclass's replace returns the subclass)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ChainConfig(ChainRecipe):
    """A `ChainRecipe` plus the settings that may change between runs of one chain: where and how it runs, and how
    far it goes."""

    output_dir: str = "dsla_chain"
    target_ratio: float = 0.5
    quality_floor: float | None = None  # stop once held-out ppl exceeds the teacher's by this factor (e.g. 1.5)
    eval_batch: int = 2
    resume: bool = True
    progress: bool = True


# Fields that may change between runs of one chain: ChainConfig's own.
RESUMABLE_FIELDS = {f.name for f in dataclasses.fields(ChainConfig)} - {
    f.name for f in dataclasses.fields(ChainRecipe)
}


def recipe_changes(saved: dict, config: ChainConfig) -> list[str]:
    """The training fields of `config` that differ from a saved chain's (`saved`: its recorded config), as
    "name: saved -> now"; fields the saved chain does not record are taken as unchanged."""
    now = asdict(config)
    return [
        f"{name}: {saved[name]!r} -> {now[name]!r}"
        for name in now
        if name not in RESUMABLE_FIELDS and name in saved and saved[name] != now[name]
    ]


def load_dsla_weights(student, folder: str | Path) -> int:
    """Copy the DSLA parameters (`*.linear_attn.*`) of a saved checkpoint into `student`; returns how many."""
    from safetensors.torch import load_file

    own = student.state_dict()
    count = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if ".linear_attn." in name and name in own:
                with torch.no_grad():
                    own[name].copy_(tensor)
                count += 1
    return count


def save_stage(student, tokenizer, output_dir: Path, state: dict) -> None:
    """Write the checkpoint (atomically replaced) and the chain metrics, on the main process only."""
    if is_main_process():
        tmp = output_dir / f"{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CHAIN_FILE).write_text(json.dumps(state, indent=2))
        final = output_dir / CHECKPOINT
        old = output_dir / f"{CHECKPOINT}.old"
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old, ignore_errors=True)
        (output_dir / CHAIN_FILE).write_text(json.dumps(state, indent=2))
    barrier()


def _recorded_config(config: ChainConfig) -> dict:
    """The config as `chain.json` records it (without `progress`, which says nothing about the training)."""
    return {k: v for k, v in asdict(config).items() if k not in ("progress",)}


def _resumed_state(student, config: ChainConfig, order: list[int], output_dir: Path) -> dict | None:
    """The saved chain state to continue, with its DSLA weights loaded into `student`; None when there is none (or
    `config.resume` is off). Refuses a saved chain of another conversion order or recipe."""
    state_file = output_dir / CHECKPOINT / CHAIN_FILE
    if not (config.resume and state_file.is_file()):
        return None
    state = json.loads(state_file.read_text())
    if state["conversion_order"] != order:
        raise ValueError(f"{state_file} was made with another conversion order: {state['conversion_order']}")
    changed = recipe_changes(state.get("config", {}), config)
    if changed:
        raise ValueError(
            f"{state_file} was trained with another recipe ({', '.join(changed)}): resuming would mix the two. "
            "Start afresh (--no-resume / ChainConfig(resume=False)) or use another output folder."
        )
    load_dsla_weights(student, output_dir / CHECKPOINT)
    if (state["stopped"] or "").startswith("target ratio"):
        state["stopped"] = None  # a resumed chain may aim further
    state["config"] = _recorded_config(config)
    return state


def _fresh_state(student, config: ChainConfig, order: list[int], eval_ids: torch.Tensor) -> dict:
    """The state of a chain with no stage yet: the teacher's held-out perplexity (the student with DSLA off)."""
    student.set_dsla_layers([])
    teacher_eval = perplexity(student, eval_ids, config.eval_batch, config.progress, "teacher ppl")
    return {
        "conversion_order": order,
        "num_layers": student.config.num_hidden_layers,
        "teacher": teacher_eval,
        "config": _recorded_config(config),
        "stages": [],
        "stopped": None,
    }


def _capture_rows(train_ids: torch.Tensor, config: ChainConfig, seed: int) -> torch.Tensor:
    """The training rows a layer-alone stage captures: `capture_sequences` of them, drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return train_ids[torch.randperm(len(train_ids), generator=g)[: config.capture_sequences]]


def _eval_rows(eval_ids: torch.Tensor, config: ChainConfig) -> torch.Tensor:
    """The held-out rows a layer-alone stage is measured on."""
    return eval_ids[: max(1, config.eval_batch)]


def _teacher_captures(
    student, config: ChainConfig, todo: list[int], train_ids: torch.Tensor, eval_ids: torch.Tensor
) -> dict[int, tuple]:
    """With `capture="teacher"`: every layer of `todo`'s (train inputs, train outputs, eval inputs, eval outputs) from
    one pass of the student with DSLA off; else (or with nothing to do) an empty dict."""
    if not (config.layer_alone_steps > 0 and config.capture == "teacher" and todo):
        if config.capture not in ("chain", "teacher"):
            raise ValueError(f"capture must be 'chain' or 'teacher', got {config.capture!r}")
        return {}
    active = student.dsla_layers
    student.set_dsla_layers([])
    rows = _capture_rows(train_ids, config, config.seed)
    _, xs, ys = capture_all_layers(
        student, rows, progress=config.progress and is_main_process(), layers=todo, residual=False
    )
    _, xe, ye = capture_all_layers(student, _eval_rows(eval_ids, config), layers=todo, residual=False)
    teacher_io = {i: (xs[i], ys[i], xe[i], ye[i]) for i in todo}
    del xs, ys, xe, ye
    student.set_dsla_layers(active)
    return teacher_io


def _layer_alone_stage(
    student, layer: int, stage: int, config: ChainConfig, train_ids, eval_ids, teacher_io: dict
) -> dict:
    """Train `layer` alone, teacher-forced on its inputs (captured up front, or now with the earlier conversions in
    place) against its softmax attention's outputs."""
    if layer in teacher_io:
        x, y, x_eval, y_eval = teacher_io.pop(layer)
    else:
        x, y = capture_layer_io(student, layer, _capture_rows(train_ids, config, config.seed + stage))
        x_eval, y_eval = capture_layer_io(student, layer, _eval_rows(eval_ids, config))
    return fit_layer_alone(
        student,
        layer,
        x,
        y,
        config.layer_alone_steps,
        config.layer_alone_lr,
        config.layer_alone_batch,
        x_eval,
        y_eval,
        seed=config.seed + stage,
        progress=config.progress and is_main_process(),
        schedule=config.layer_alone_schedule,
    )


def _distill_phase(student, teacher, tokenizer, train_ds, layer: int, config: ChainConfig, stage: int) -> dict:
    """The short `DSLADistillTrainer` phase of a stage (logits and alignment, everything converted so far in place),
    training `layer` only. Returns its steps, first and last logged losses and runtime."""
    from .distill import DSLADistillConfig, DSLADistillTrainer, distill_settings

    args = DSLADistillConfig(
        output_dir=os.path.join(config.output_dir, "trainer"),
        max_steps=config.distill_steps,
        per_device_train_batch_size=config.distill_batch,
        learning_rate=config.distill_lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        **distill_settings(config),
        trained_layers=[layer],
        seed=config.seed + stage,
        use_cpu=student.device.type == "cpu",  # train where the student is
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
    )
    if tokenizer is None:
        raise ValueError("The distillation phase (distill_steps > 0) needs the tokenizer")
    trainer = DSLADistillTrainer(
        model=student, args=args, teacher=teacher, train_dataset=train_ds, processing_class=tokenizer
    )
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "align_loss" in h]
    student.requires_grad_(False)
    keys = ("loss", "align_loss", "kl_loss", "ce_loss", "gate_cosine")
    return {
        "steps": config.distill_steps,
        "first": {k: logs[0].get(k) for k in keys} if logs else {},
        "last": {k: logs[-1].get(k) for k in keys} if logs else {},
        "train_runtime": result.metrics.get("train_runtime"),
    }


def _stop_reason(record: dict, config: ChainConfig, stage: int, target: int) -> str | None:
    """Why the chain stops after this stage's `record` (quality floor passed, target reached), or None."""
    if config.quality_floor is not None and record["ppl_ratio"] > config.quality_floor:
        return f"quality floor: ppl {record['ppl_ratio']:.3f}x the teacher's > {config.quality_floor}"
    if stage + 1 == target:
        return f"target ratio {config.target_ratio} reached"
    return None


def run_chain(student, train_ds, eval_ds, config: ChainConfig, tokenizer=None, teacher=None) -> dict:
    """Run (or resume) the chain on a student whose `config.conversion_order` is the ranking. `train_ds` and
    `eval_ds` are packed datasets (`input_ids` rows of equal length, disjoint texts). Returns the chain state
    (also in `output_dir/chain.json` and in the checkpoint)."""
    output_dir = Path(config.output_dir)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    order = list(student.config.conversion_order)
    n = student.config.num_hidden_layers
    target = min(len(order), ratio_to_layers(config.target_ratio, n))
    student.requires_grad_(False)
    train_ids = torch.tensor(train_ds["input_ids"])
    eval_ids = torch.tensor(eval_ds["input_ids"])
    state = _resumed_state(student, config, order, output_dir) or _fresh_state(student, config, order, eval_ids)
    done = len(state["stages"])
    teacher_ppl = state["teacher"]["ppl"]
    teacher_io = _teacher_captures(student, config, order[done:target], train_ids, eval_ids)
    show = config.progress and is_main_process()
    bar = tqdm(total=target, initial=min(done, target), desc="chain", disable=not show)
    for stage in range(done, target):
        if state["stopped"]:
            break
        layer = order[stage]
        start = time.perf_counter()
        record = {"stage": stage, "layer": layer, "dsla_layers": sorted(order[: stage + 1]), "ratio": (stage + 1) / n}
        # 1. layer alone, teacher-forced on inputs captured with the earlier conversions in place
        student.set_dsla_layers(order[:stage])
        if config.layer_alone_steps > 0:
            record["layer_alone"] = _layer_alone_stage(student, layer, stage, config, train_ids, eval_ids, teacher_io)
        # 2. logits (and alignment) with everything converted so far
        student.set_dsla_layers(order[: stage + 1])
        if config.distill_steps > 0:
            record["distill"] = _distill_phase(student, teacher, tokenizer, train_ds, layer, config, stage)
        # 3. frozen; held-out evaluation
        student.requires_grad_(False)
        student.eval()
        record["eval"] = perplexity(student, eval_ids, config.eval_batch, config.progress, f"eval {stage + 1}")
        record["ppl_ratio"] = record["eval"]["ppl"] / teacher_ppl
        record["seconds"] = time.perf_counter() - start
        state["stages"].append(record)
        state["stopped"] = _stop_reason(record, config, stage, target) or state["stopped"]
        student.config.conversion_order = order
        save_stage(student, tokenizer, output_dir, state)
        bar.update(1)
        bar.set_postfix(layer=layer, ppl=f"{record['eval']['ppl']:.2f}", x=f"{record['ppl_ratio']:.3f}")
    bar.close()
    student.set_dsla_layers(order[: len(state["stages"])])
    return state
