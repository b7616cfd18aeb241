"""The demo's recipe and its training, which `dsla demo` (dsla_hf.commands.demo) and `dsla ablate` share.

The distillation recipe is one object, `DEMO_RECIPE` (a `DemoRecipe`: the chain's `ChainRecipe` plus the demo's
data, ranking and DSLA layer options), and `train_chain(recipe, folder)` runs it (data, ranking, chain, as
docs/design.md §2-§3 describe): the GLA ablation (`dsla ablate`) trains with `DEMO_RECIPE.replace(num_states=1)`,
exactly the demo's recipe with one state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .trainers.chain import ChainConfig, ChainRecipe, run_chain


@dataclass(frozen=True)
class DemoRecipe(ChainRecipe):
    """The demo's distillation recipe (how it was chosen: the README's "Demo results"; measured run in
    benchmarks/results/demo/): how each stage trains (`ChainRecipe`, with the demo's layer-alone stage below) plus the
    data, ranking and DSLA layer options. `chain_config` turns it into the chain's `ChainConfig`, `dsla_options` into
    the DSLA options of `convert_llama_to_dsla`; `replace(...)` gives a variant (e.g. `num_states=1`, the
    single-state GLA ablation)."""

    # the layer-alone stage: more steps, rows and batch, a higher decaying rate than the chain's defaults (the TRL
    # phase keeps the chain's)
    layer_alone_steps: int = 100
    layer_alone_lr: float = 1e-2
    layer_alone_batch: int = 4
    layer_alone_schedule: str = "cosine"
    capture_sequences: int = 32
    # data (docs/design.md §4 offline defaults): packed rows of `seq_len` tokens
    seq_len: int = 512
    train_sequences: int = 64
    eval_sequences: int = 16  # held-out 512-token rows; flattened, also the stream scored with 2048 tokens of context
    # ranking and chain
    ranking: str = "entropy"
    ranking_first: str = "high"  # highest attention entropy converted first (measured: better ppl, passkey kept)
    ratio: float = 0.5
    chain_eval_sequences: int = 2  # the chain's per-stage held-out evaluation (the final one uses all)
    # DSLA layer: the default preset (two states, 64-token exact window, Hedgehog features, ...) except for these
    num_states: int = 2
    history_half_life: float | None = None  # initial half-life of the first state (None: the preset's)
    window: int | None = None  # exact softmax window of the DSLA layers (None: the preset's 64; 0: none)

    def dsla_options(self) -> dict:
        """Options of `convert_llama_to_dsla` / `DSLAConfig` that differ from the default preset."""
        options = {"dsla_num_states": self.num_states}
        if self.history_half_life is not None:
            options["dsla_history_half_life"] = self.history_half_life
        if self.window is not None:
            options["dsla_window"] = self.window
        return options

    def chain_config(self, output_dir: str | Path, resume: bool = True, progress: bool = True) -> ChainConfig:
        """The chain's config: this recipe's `ChainRecipe` fields, `ratio` as the target and `chain_eval_sequences`
        as the per-stage evaluation."""
        recipe = {f.name: getattr(self, f.name) for f in dataclasses.fields(ChainRecipe)}
        return ChainConfig(
            **recipe,
            output_dir=str(output_dir),
            target_ratio=self.ratio,
            eval_batch=self.chain_eval_sequences,
            resume=resume,
            progress=progress,
        )


DEMO_RECIPE = DemoRecipe()


def demo_datasets(tokenizer, recipe: DemoRecipe = DEMO_RECIPE):
    """The packed training and held-out datasets of the recipe (offline defaults)."""
    from .data import build_datasets

    return build_datasets(
        tokenizer, recipe.seq_len, None, None, recipe.train_sequences, recipe.eval_sequences, recipe.seed
    )


def train_chain(
    recipe: DemoRecipe,
    output_dir: str | Path,
    teacher=None,
    tokenizer=None,
    datasets=None,
    order: list[int] | None = None,
    resume: bool = True,
    progress: bool = True,
    before_chain=None,
) -> dict:
    """Run the recipe: convert the teacher (every layer gets DSLA weights), rank (unless `order` is given), chain.
    `before_chain(student, order)` runs between ranking and chain (the demo measures the untrained model there).
    Returns a dict with `student`, `tokenizer`, `ranking` (None when `order` was given), `order`, `chain` (the chain
    state), `train_ds` and `heldout_ds`."""
    from .models.dsla.convert import convert_llama_to_dsla
    from .ranking import rank_layers
    from .teacher import load_teacher

    torch.manual_seed(recipe.seed)
    if teacher is None:
        teacher, tokenizer = load_teacher()
    student = convert_llama_to_dsla(teacher, layers="all", active=[], **recipe.dsla_options())
    student.requires_grad_(False)
    train_ds, heldout_ds = datasets if datasets is not None else demo_datasets(tokenizer, recipe)
    ranking = None
    if order is None:
        calib = torch.tensor(train_ds["input_ids"][:8])
        heldout_ids = torch.tensor(heldout_ds["input_ids"][:2])
        ranking = rank_layers(
            student, calib, recipe.ranking, heldout_ids, progress=progress, first=recipe.ranking_first
        )
        order = ranking["order"]
    student.config.conversion_order = list(order)
    if before_chain is not None:
        before_chain(student, order)
    config = recipe.chain_config(output_dir, resume=resume, progress=progress)
    eval_ds = heldout_ids_dataset(heldout_ds, recipe.chain_eval_sequences)
    chain = run_chain(student, train_ds, eval_ds, config, tokenizer, teacher=None)
    return {
        "student": student,
        "tokenizer": tokenizer,
        "ranking": ranking,
        "order": list(order),
        "chain": chain,
        "train_ds": train_ds,
        "heldout_ds": heldout_ds,
    }


def heldout_ids_dataset(heldout_ds, rows: int):
    """The first `rows` held-out sequences: the chain's per-stage evaluation (the final one uses them all)."""
    return heldout_ds.select(range(min(rows, len(heldout_ds))))
