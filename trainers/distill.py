"""Distillation of DSLA layers on TRL's `SFTTrainer` (docs/design.md §3).

Losses, each weighted and logged on its own:

- `align`: the converted layer's OUTPUT against the teacher's: its attention output against the teacher's softmax
  attention on the same input (`alignment_target="attention"`), or the hidden state after the layer against the
  teacher's hidden state after that layer (`"hidden"`); MSE normalised by the target's mean square.
- `kl`: KL(teacher || student) of the next-token distributions, summed over the vocabulary and averaged over
  non-padding tokens (token-normalised; never `batchmean` over a 3-D tensor), times temperature squared.
- `ce`: next-token cross-entropy on the labels.
- `gate_div`: cosine similarity between the history and recency log gates (pushes the two states apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer


@dataclass
class DSLADistillConfig(SFTConfig):
    """`SFTConfig` plus the weights of the distillation losses and which DSLA layers train."""

    alignment_weight: float = field(default=1.0, metadata={"help": "weight of the per-layer output alignment"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the token-normalised logit KL"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of the next-token cross-entropy"})
    gate_divergence_weight: float = field(default=0.01, metadata={"help": "weight of the gate cosine similarity"})
    kl_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL term"})
    alignment_target: str = field(default="attention", metadata={"help": "'attention' output or 'hidden' state"})
    trained_layers: list[int] | None = field(
        default=None, metadata={"help": "DSLA layers whose parameters train (default: every active DSLA layer)"}
    )
    # Defaults suited to distillation on pre-packed text.
    report_to: str | list[str] = field(default="none", metadata={"help": "integrations to report to"})
    remove_unused_columns: bool = False
    save_strategy: str = "no"
    max_length: int | None = None
    # Only a few small modules train: recomputing the whole model costs more than it saves.
    activation_checkpointing: bool | None = False
    gradient_checkpointing: bool | None = None  # the deprecated alias (SFTConfig sets it to True)

    def __post_init__(self):
        if self.bf16 is None and not torch.cuda.is_available():
            self.bf16 = False  # TRL defaults to bf16 autocast, which only slows CPUs down
        super().__post_init__()
        if self.alignment_target not in ("attention", "hidden"):
            raise ValueError(f"alignment_target must be 'attention' or 'hidden', got {self.alignment_target!r}")


def token_normalised_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, summed over the vocabulary, averaged over tokens where `mask` is true."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T]
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * t * t


def gate_cosine(log_gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity between the history and recency log gates of [B, T, S, H, F] gates, over the tokens
    where `mask` [B, T] is nonzero (padding and a window's null entries have no gates)."""
    cosine = F.cosine_similarity(log_gates[:, :, 0], log_gates[:, :, 1], dim=-1, eps=1e-8)  # [B, T, H]
    if mask is None:
        return cosine.mean()
    weight = mask[:, :, None].to(cosine.dtype).expand_as(cosine)
    return (cosine * weight).sum() / weight.sum().clamp(min=1)


def normalised_error(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared error of `out` to `target` over the tokens where `valid` [B, T] is true, divided by the target's
    squared norm there (the alignment term of one layer)."""
    m = valid[..., None].to(out.dtype)
    err = ((out.float() - target.float()).pow(2) * m).sum()
    scale = (target.float().pow(2) * m).sum().clamp(min=1e-12)
    return err / scale


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each token's logits against the next label, over the next tokens where `valid` is true."""
    shift_labels = labels[:, 1:].masked_fill(~valid[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100)


def distill_settings(source) -> dict:
    """The settings `DSLADistillConfig` adds to `SFTConfig` (loss weights, alignment target, ...) that the dataclass
    `source` also has, by name: a chain recipe passes its loss settings on without listing them."""
    own = {f.name for f in fields(DSLADistillConfig)} - {f.name for f in fields(SFTConfig)}
    return {f.name: getattr(source, f.name) for f in fields(source) if f.name in own}


def _model_inputs(inputs: dict) -> dict:
    """The batch's model inputs. Without padding the attention mask is dropped: then Transformers' softmax layers
    (the teacher's, the alignment target's) find packed documents in the position ids, as the DSLA layers do."""
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    if "attention_mask" in model_inputs and bool(model_inputs["attention_mask"].all()):
        del model_inputs["attention_mask"]
    return model_inputs


class DSLADistillTrainer(SFTTrainer):
    """`SFTTrainer` that distils the teacher into the student's trainable DSLA layers.

    Only the DSLA parameters of `args.trained_layers` (default: the active DSLA layers) train; everything else is
    frozen. `teacher` is a frozen model with the teacher's weights (typically the `LlamaForCausalLM` the student was
    converted from, sharing its tensors), prepared through `accelerate` for evaluation; with `teacher=None` the
    student itself, with its DSLA layers switched off, serves as the teacher (its weights are the teacher's).
    """

    def __init__(self, model, args: DSLADistillConfig, teacher=None, **kwargs):
        self.trained_layers = list(args.trained_layers if args.trained_layers is not None else model.dsla_layers)
        model.requires_grad_(False)
        for i in self.trained_layers:
            attn = model.model.layers[i].linear_attn
            if attn is None:
                raise ValueError(f"Layer {i} has no DSLA weights")
            attn.requires_grad_(True)
        super().__init__(model=model, args=args, **kwargs)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.teacher = teacher

    def _log_metric(self, mode: str, name: str, value: torch.Tensor) -> None:
        value = self.accelerator.gather_for_metrics(value.detach().reshape(1)).mean().item()
        self._metrics[mode][name].append(value)

    @torch.no_grad()
    def _teacher_forward(self, student, inputs: dict, want_hidden: bool):
        if self.teacher is not None:
            out = self.teacher(**inputs, use_cache=False, output_hidden_states=want_hidden)
            return out.logits, out.hidden_states
        unwrapped = self.accelerator.unwrap_model(student)
        active = unwrapped.dsla_layers
        unwrapped.set_dsla_layers([])
        try:
            out = unwrapped(**inputs, use_cache=False, output_hidden_states=want_hidden)
        finally:
            unwrapped.set_dsla_layers(active)
        return out.logits, out.hidden_states

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        model_inputs = _model_inputs(inputs)
        input_ids, attention_mask = inputs["input_ids"], model_inputs.get("attention_mask")
        labels = inputs.get("labels")
        align_attention = args.alignment_weight > 0 and args.alignment_target == "attention"
        want_hidden = args.alignment_weight > 0 and args.alignment_target == "hidden"
        # What the losses read, recorded by the model (Transformers' output capturing), in layer order.
        outputs = model(
            **model_inputs,
            use_cache=False,
            output_hidden_states=want_hidden,
            output_attention_inputs=align_attention,
            output_dsla_attentions=align_attention,
            output_dsla_gates=args.gate_divergence_weight > 0,
        )
        ran = unwrapped.dsla_layers
        trained = [i for i in self.trained_layers if i in ran]  # a trained layer that did not run as DSLA has no term
        logits = outputs.logits
        zero = logits.new_zeros(())
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

        need_teacher = args.kl_weight > 0 or want_hidden
        teacher_logits, teacher_hidden = (
            self._teacher_forward(model, model_inputs, want_hidden) if need_teacher else (None, None)
        )

        align = zero
        if args.alignment_weight > 0 and trained:
            position_ids = inputs.get("position_ids")
            align = self._alignment_loss(
                unwrapped, outputs, trained, teacher_hidden, valid, attention_mask, position_ids
            )

        kl = zero
        if args.kl_weight > 0:
            kl = token_normalised_kl(logits, teacher_logits, valid, args.kl_temperature)

        ce = zero
        if args.ce_weight > 0 and labels is not None:
            ce = next_token_cross_entropy(logits, labels, valid)

        gate = zero
        if args.gate_divergence_weight > 0:
            gates = [outputs.dsla_gates[ran.index(i)] for i in trained]
            sims = [gate_cosine(g.materialize(), g.mask) for g in gates if g.num_states > 1]
            gate = torch.stack(sims).mean() if sims else zero

        loss = (
            args.alignment_weight * align
            + args.kl_weight * kl
            + args.ce_weight * ce
            + args.gate_divergence_weight * gate
        )
        for name, value in (("align_loss", align), ("kl_loss", kl), ("ce_loss", ce), ("gate_cosine", gate)):
            self._log_metric(mode, name, value)
        return (loss, outputs) if return_outputs else loss

    def _alignment_loss(
        self, unwrapped, outputs, trained: list[int], teacher_hidden, valid, attention_mask, position_ids
    ):
        """Mean over the `trained` layers of the normalised error of each layer's output to its target: the
        teacher's softmax attention on the same input (`alignment_target="attention"`), or the teacher's hidden
        state after that layer (`"hidden"`)."""
        ran = unwrapped.dsla_layers
        terms = []
        for i in trained:
            if self.args.alignment_target == "attention":
                out = outputs.dsla_attentions[ran.index(i)]
                with torch.no_grad():  # the teacher's softmax attention on the same input
                    target = unwrapped.model.softmax_attention(
                        i, outputs.attention_inputs[i].detach(), attention_mask, position_ids
                    )
            else:
                out, target = outputs.hidden_states[i + 1], teacher_hidden[i + 1]
            terms.append(normalised_error(out, target, valid))
        return torch.stack(terms).mean()
