"""The cheap first stage of docs/design.md §3: one DSLA layer trained alone to reproduce the teacher's attention
output on inputs captured from the model (teacher-forced, as LoLCATs does).

Inputs are captured with forwards that stop at the layer, through the model as it stands (earlier conversions in
place), so the layer learns on the inputs it will see. With `torch.distributed` initialised, every process trains on
its own share of the captured batches and gradients are averaged (data parallel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import process_group


class _Stop(Exception):
    """Raised once the captured layer has run: nothing above it is needed."""


def _layers(model):
    return model.model.layers


@torch.no_grad()
def capture_layer_io(model, layer_idx: int, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False):
    """Inputs of layer `layer_idx`'s attention (after its input norm) and its softmax attention's outputs, for
    every row of `input_ids`, from forwards that stop at that layer. The layer must run as softmax attention."""
    block = _layers(model)[layer_idx]
    inputs, outputs = [], []

    def keep_input(module, args, out):
        inputs.append(out.detach())

    def keep_output(module, args, out):
        outputs.append(out[0].detach())
        raise _Stop

    hooks = [
        block.input_layernorm.register_forward_hook(keep_input),
        block.self_attn.register_forward_hook(keep_output),
    ]
    try:
        for rows in tqdm(input_ids.split(batch_size), desc=f"capture L{layer_idx}", leave=False, disable=not progress):
            try:
                model.model(rows.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(inputs), torch.cat(outputs)


@torch.no_grad()
def capture_all_layers(
    model,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    layers: list[int] | None = None,
    residual: bool = True,
):
    """One pass of a model running softmax attention everywhere: for every layer, the residual stream entering it,
    its attention input (after the norm) and its attention output. Lists of [N, T, hidden] tensors per layer.

    `layers` keeps only those layers' tensors (the others' entries are None) and `residual=False` skips the residual
    stream: a chain needs only the attention inputs and outputs of the layers it converts, and keeping every layer's
    three tensors costs ~100 MB per 512-token sequence."""
    blocks = _layers(model)
    n = len(blocks)
    keep = set(range(n) if layers is None else layers)
    resid, x, y = ([[] for _ in range(n)] for _ in range(3))
    hooks = []
    for i, block in enumerate(blocks):
        if i not in keep:
            continue
        if residual:
            hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: resid[i].append(a[0].detach())))
        hooks.append(block.input_layernorm.register_forward_hook(lambda m, a, out, i=i: x[i].append(out.detach())))
        hooks.append(block.self_attn.register_forward_hook(lambda m, a, out, i=i: y[i].append(out[0].detach())))
    try:
        for rows in tqdm(input_ids.split(batch_size), desc="capture", leave=False, disable=not progress):
            model.model(rows.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    def join(parts):
        return [torch.cat(t) if t else None for t in parts]

    return join(resid), join(x), join(y)


def relative_error(linear_attn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4) -> float:
    """||DSLA(x) - teacher(x)|| / ||teacher(x)|| over captured inputs."""
    num = den = 0.0
    positions = torch.arange(x.shape[1], device=x.device)[None]
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            out = linear_attn(hidden_states=xb, position_embeddings=linear_attn.rotary_emb(xb, positions))
            num += (out.float() - yb.float()).pow(2).sum().item()
            den += yb.float().pow(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def fit_layer_alone(
    model,
    layer_idx: int,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 2,
    x_eval: torch.Tensor | None = None,
    y_eval: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
    schedule: str = "constant",
) -> dict:
    """Train the DSLA parameters of one layer alone (Adam on the MSE to the teacher's attention output, normalised by
    the target's mean square) on captured inputs `x` -> `y`. `schedule` is `"constant"` or `"cosine"` (the learning
    rate decays to a tenth of `lr` by the last step). Returns the relative errors before and after (on
    `x_eval`/`y_eval` when given, else on `x`/`y`) and the final training loss."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    block = _layers(model)[layer_idx]
    attn = block.linear_attn
    if attn is None:
        raise ValueError(f"Layer {layer_idx} has no DSLA weights")
    params = [p for p in attn.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    x_eval, y_eval = (x, y) if x_eval is None else (x_eval, y_eval)
    before = relative_error(attn, x_eval, y_eval)
    dist = process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = None
    if schedule == "cosine" and steps > 1:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps - 1, eta_min=0.1 * lr)
    positions = torch.arange(x.shape[1], device=x.device)[None]
    scale = y.float().pow(2).mean().clamp(min=1e-12)
    order, cursor, loss_value = torch.randperm(len(x), generator=generator), 0, float("nan")
    for _step in tqdm(range(steps), desc=f"layer {layer_idx} alone", leave=False, disable=not progress):
        if cursor + batch_size * world > len(order):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batch = order[cursor : cursor + batch_size * world][rank::world]  # same permutation everywhere, own share
        cursor += batch_size * world
        xb = x[batch]
        out = attn(hidden_states=xb, position_embeddings=attn.rotary_emb(xb, positions))
        loss = F.mse_loss(out.float(), y[batch].float()) / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_value = loss.item()
    after = relative_error(attn, x_eval, y_eval)
    for p, flag in zip(params, was):
        p.requires_grad_(flag)
    return {"rel_error_before": before, "rel_error_after": after, "train_loss": loss_value, "steps": steps}
