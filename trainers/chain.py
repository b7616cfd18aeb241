"""Chained distillation (docs/design.md §3): convert layers one at a time in ranking order.

Stage k converts layer `order[k]`: its DSLA weights start from the teacher's attention (as `convert_llama_to_dsla`
initialises them), train with every earlier conversion in place (a layer-alone stage on captured inputs, then an
optional short `DSLADistillTrainer` phase on logits), and are then frozen. Held-out perplexity is measured after
every stage; the chain stops at a target ratio or when perplexity passes a quality floor. After every stage the model
is saved (safetensors, `save_pretrained`) with `chain.json` (every stage's metrics) beside it, so the chain resumes
from the last finished stage, and the one checkpoint serves every prefix: `model.set_dsla_layers(ratio)`.

    dsla distill --ratio 0.5 --output dsla_chain/        # or: accelerate launch --num_processes 2 --cpu -m ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..configuration_dsla import ratio_to_layers
from ..devices import add_device_arguments, device_and_dtype
from ..distributed import barrier, is_main_process
from ..evaluation import perplexity
from .layer_alone import capture_layer_io, fit_layer_alone

CHAIN_FILE = "chain.json"
CHECKPOINT = "checkpoint"


@dataclass
class ChainConfig:
    output_dir: str = "dsla_chain"
    target_ratio: float = 0.5
    quality_floor: float | None = None  # stop once held-out ppl exceeds the teacher's by this factor (e.g. 1.5)
    # layer-alone stage (teacher-forced on captured inputs)
    layer_alone_steps: int = 40
    layer_alone_lr: float = 3e-3
    layer_alone_batch: int = 2
    layer_alone_schedule: str = "constant"  # or "cosine" (decays to a tenth of the learning rate)
    capture_sequences: int = 8
    # "chain": capture each layer's inputs with the earlier conversions in place (a forward up to the layer per stage);
    # "teacher": one teacher pass captures every layer's inputs up front (LoLCATs-style, much cheaper)
    capture: str = "chain"
    # the TRL phase (DSLADistillTrainer: KL, alignment, gate divergence) after the layer-alone stage (0: skipped)
    distill_steps: int = 8
    distill_lr: float = 1e-3
    distill_batch: int = 1
    alignment_weight: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    gate_divergence_weight: float = 0.01
    alignment_target: str = "attention"
    eval_batch: int = 2
    seed: int = 0
    resume: bool = True
    progress: bool = True


# Fields that may change between runs of one chain: where and how it runs, and how far it goes.
RESUMABLE_FIELDS = {"output_dir", "target_ratio", "quality_floor", "eval_batch", "resume", "progress"}


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


def _distill_phase(student, teacher, tokenizer, train_ds, layer: int, config: ChainConfig, stage: int) -> dict:
    from .distill import DSLADistillConfig, DSLADistillTrainer

    args = DSLADistillConfig(
        output_dir=os.path.join(config.output_dir, "trainer"),
        max_steps=config.distill_steps,
        per_device_train_batch_size=config.distill_batch,
        learning_rate=config.distill_lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        alignment_weight=config.alignment_weight,
        kl_weight=config.kl_weight,
        ce_weight=config.ce_weight,
        gate_divergence_weight=config.gate_divergence_weight,
        alignment_target=config.alignment_target,
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
    for p in student.parameters():
        p.requires_grad_(False)
    keys = ("loss", "align_loss", "kl_loss", "ce_loss", "gate_cosine")
    return {
        "steps": config.distill_steps,
        "first": {k: logs[0].get(k) for k in keys} if logs else {},
        "last": {k: logs[-1].get(k) for k in keys} if logs else {},
        "train_runtime": result.metrics.get("train_runtime"),
    }


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
    for p in student.parameters():
        p.requires_grad_(False)
    train_ids = torch.tensor(train_ds["input_ids"])
    eval_ids = torch.tensor(eval_ds["input_ids"])

    state_file = output_dir / CHECKPOINT / CHAIN_FILE
    state = None
    if config.resume and state_file.is_file():
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
        state["config"] = {k: v for k, v in asdict(config).items() if k not in ("progress",)}
    if state is None:
        student.set_dsla_layers([])
        teacher_eval = perplexity(student, eval_ids, config.eval_batch, config.progress, "teacher ppl")
        state = {
            "conversion_order": order,
            "num_layers": n,
            "teacher": teacher_eval,
            "config": {k: v for k, v in asdict(config).items() if k not in ("progress",)},
            "stages": [],
            "stopped": None,
        }
    done = len(state["stages"])
    teacher_ppl = state["teacher"]["ppl"]
    teacher_io = {}
    if config.layer_alone_steps > 0 and config.capture == "teacher" and done < target:
        from .layer_alone import capture_all_layers

        active = student.dsla_layers
        student.set_dsla_layers([])
        g = torch.Generator().manual_seed(config.seed)
        rows = torch.randperm(len(train_ids), generator=g)[: config.capture_sequences]
        todo = order[done:target]
        _, xs, ys = capture_all_layers(
            student, train_ids[rows], progress=config.progress and is_main_process(), layers=todo, residual=False
        )
        _, xe, ye = capture_all_layers(student, eval_ids[: max(1, config.eval_batch)], layers=todo, residual=False)
        teacher_io = {i: (xs[i], ys[i], xe[i], ye[i]) for i in todo}
        del xs, ys, xe, ye
        student.set_dsla_layers(active)
    elif config.capture not in ("chain", "teacher"):
        raise ValueError(f"capture must be 'chain' or 'teacher', got {config.capture!r}")
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
            if layer in teacher_io:
                x, y, x_eval, y_eval = teacher_io.pop(layer)
            else:
                g = torch.Generator().manual_seed(config.seed + stage)
                rows = torch.randperm(len(train_ids), generator=g)[: config.capture_sequences]
                x, y = capture_layer_io(student, layer, train_ids[rows])
                x_eval, y_eval = capture_layer_io(student, layer, eval_ids[: max(1, config.eval_batch)])
            record["layer_alone"] = fit_layer_alone(
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
            del x, y, x_eval, y_eval
        # 2. logits (and alignment) with everything converted so far
        student.set_dsla_layers(order[: stage + 1])
        if config.distill_steps > 0:
            record["distill"] = _distill_phase(student, teacher, tokenizer, train_ds, layer, config, stage)
        # 3. frozen; held-out evaluation
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
        record["eval"] = perplexity(student, eval_ids, config.eval_batch, config.progress, f"eval {stage + 1}")
        record["ppl_ratio"] = record["eval"]["ppl"] / teacher_ppl
        record["seconds"] = time.perf_counter() - start
        state["stages"].append(record)
        if config.quality_floor is not None and record["ppl_ratio"] > config.quality_floor:
            state["stopped"] = f"quality floor: ppl {record['ppl_ratio']:.3f}x the teacher's > {config.quality_floor}"
        elif stage + 1 == target:
            state["stopped"] = f"target ratio {config.target_ratio} reached"
        student.config.conversion_order = order
        save_stage(student, tokenizer, output_dir, state)
        bar.update(1)
        bar.set_postfix(layer=layer, ppl=f"{record['eval']['ppl']:.2f}", x=f"{record['ppl_ratio']:.3f}")
    bar.close()
    student.set_dsla_layers(order[: len(state["stages"])])
    return state


# --- CLI: dsla distill -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded teacher) or a Llama / DSLA folder")
    parser.add_argument("--ranking", default="entropy", help="'entropy', 'measured', 'index' or a ranking JSON")
    parser.add_argument("--train", nargs="*", default=None, help="training text: corpus names, files or hub names")
    parser.add_argument("--heldout", default=None, help="held-out text (never one of the training manuals)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5, help="target conversion ratio")
    parser.add_argument("--quality-floor", type=float, default=None, help="stop past this ppl ratio to the teacher")
    parser.add_argument("--layer-alone-steps", type=int, default=40)
    parser.add_argument("--distill-steps", type=int, default=8, help="TRL phase steps per stage (0: none)")
    parser.add_argument("--output", default="dsla_chain")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser, dtype_default=None)


def run(args: argparse.Namespace) -> int:
    from ..data import build_datasets
    from ..ranking import load_student, rank_layers

    torch.manual_seed(args.seed)
    student, tokenizer = load_student(args.model, device=device_and_dtype(args)[0])
    train_ds, eval_ds = build_datasets(
        tokenizer, args.seq_len, args.train, args.heldout, args.train_sequences, args.eval_sequences, args.seed
    )
    if args.ranking == "index":
        order = list(range(student.config.num_hidden_layers))
    elif args.ranking in ("entropy", "measured"):
        calib = torch.tensor(train_ds["input_ids"][:8])
        order = rank_layers(student, calib, args.ranking, torch.tensor(eval_ds["input_ids"]), progress=False)["order"]
    else:
        order = json.loads(Path(args.ranking).read_text())["order"]
    student.config.conversion_order = order
    config = ChainConfig(
        output_dir=args.output,
        target_ratio=args.ratio,
        quality_floor=args.quality_floor,
        layer_alone_steps=args.layer_alone_steps,
        distill_steps=args.distill_steps,
        seed=args.seed,
        resume=not args.no_resume,
        progress=is_main_process(),
    )
    state = run_chain(student, train_ds, eval_ds, config, tokenizer)
    if is_main_process():
        print(f"teacher ppl {state['teacher']['ppl']:.3f}; stopped: {state['stopped']}")
        for s in state["stages"]:
            print(
                f"  stage {s['stage'] + 1}: layer {s['layer']:2d}  ppl {s['eval']['ppl']:.3f}  x{s['ppl_ratio']:.3f}"
            )
        print(f"checkpoint: {Path(args.output) / CHECKPOINT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m dsla_hf.trainers.chain ...` (sets up torch.distributed first)."""
    parser = argparse.ArgumentParser(prog="dsla-distill", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # initialises torch.distributed (gloo on CPU)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
