"""What runs the model: one forward per step over groups of rows that each have their own cache and their own
layer kinds (the paper's mixed batches), the moves of requests between kinds (a request's keys and values folded
for its own new DSLA layers), the prefix cache, and the memory all of it takes.

Running requests decode in batches, one per set of DSLA layers: a left-padded cache whose rows hold the same kind
of state per layer (`DSLACache.stack` to join, `batch_select_indices` and `trim_left` to leave). A request being
prefilled has a cache of its own. A step's groups (each batch's decode tokens, each prompt chunk) attend in their
own caches with their own kinds, and share every layer's MLP (`forward_groups`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.dsla.cache_dsla import DSLACache
from ..models.dsla.modeling_dsla import SequenceGroup
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .request import Request
from .sampling import TokenLogprob, token_logprobs

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """Running requests that decode together: their DSLA layers, one left-padded cache (rows in the order of
    `requests`) and its 2-D padding mask."""

    layers: tuple[int, ...]
    cache: DSLACache
    mask: torch.Tensor
    requests: list[Request]

    def split(self, rows: list[int]) -> Batch:
        """These rows as a batch of their own; the others stay in this one (each cache copied once)."""
        part = Batch(self.layers, self.cache, self.mask, self.requests)
        part.keep(rows)
        self.keep([i for i in range(len(self.requests)) if i not in rows])
        return part

    def keep(self, rows: list[int]) -> None:
        """Only these rows, without the columns that are then padding in every row (left empty: no rows)."""
        if not rows:
            self.requests = []
            return
        mask = self.mask[rows]
        leading = int((mask.cumsum(1) == 0).all(0).sum())
        self.cache = self.cache.select_rows(rows, drop_left=leading)
        self.mask, self.requests = mask[:, leading:], [self.requests[i] for i in rows]


class ModelRunner:
    """Args:
    model: a `DSLALlamaForCausalLM` (eval mode); its weights' device and dtype are the requests'.
    config: the engine's `EngineConfig` (chunk size, KV budget, keep_kv, prefix caching).
    max_model_len: the longest context served.
    metrics: where prompt-token and prefix-cache counters go.
    """

    def __init__(self, model, config, max_model_len: int, metrics: Metrics):
        self.model = model
        self.config = config
        self.metrics = metrics
        text_config = model.config
        self.num_layers = text_config.num_hidden_layers
        self.order = list(text_config.conversion_order)
        # Requests' tensors live where the model's weights are; keys and values take the bytes of its dtype.
        self.device = model.device
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        element = torch.empty((), dtype=model.dtype).element_size()
        self.kv_bytes_per_token_layer = 2 * text_config.num_key_value_heads * head_dim * element
        self.kv_budget = config.kv_cache_bytes or (
            config.max_num_seqs * max_model_len * self.kv_bytes_per_token_layer * self.num_layers
        )
        self.prefix_cache = None
        if config.enable_prefix_caching:
            capacity = config.prefix_cache_bytes
            self.prefix_cache = PrefixCache(self.kv_budget // 4 if capacity is None else capacity)
        self.batches: list[Batch] = []
        self.layers: tuple[int, ...] = tuple(text_config.active_dsla_layers)  # the policy's, for new requests
        self.layer_switches = 0
        self.deferred_decreases = 0

    def layers_of(self, count: int) -> tuple[int, ...]:
        """The first `count` layers of the conversion order, sorted."""
        return tuple(sorted(self.order[: max(0, min(count, len(self.order)))]))

    @property
    def cache(self) -> DSLACache | None:
        """The running batch's cache when there is one batch (None when nothing runs)."""
        if len(self.batches) > 1:
            raise RuntimeError("Requests run in several batches of different layer kinds: see `batches`")
        return self.batches[0].cache if self.batches else None

    # --- memory --------------------------------------------------------------------------------------------------

    def kv_bytes(self, prefilling: list[Request] = ()) -> int:
        """The bytes the running batches' caches and the prefilling requests' caches take now."""
        total = sum(b.cache.memory_bytes for b in self.batches)
        return total + sum(r.cache.memory_bytes for r in prefilling if r.cache is not None)

    def kv_need(self, request: Request) -> int:
        """The keys and values a request's prompt and output take in its softmax layers, at most."""
        layers = self.layers if request.dsla_layers is None else request.dsla_layers
        softmax_layers = self.num_layers - len(layers)
        return (len(request.prompt_ids) + request.params.max_tokens) * softmax_layers * self.kv_bytes_per_token_layer

    def fits(self, request: Request, prefilling: list[Request] = ()) -> bool:
        """Whether a waiting request's keys and values fit the budget beside the running batches' and what the
        requests being prefilled will take once their prompts are done."""
        reserved = sum(self.kv_need(r) for r in prefilling)
        return self.kv_bytes() + reserved + self.kv_need(request) <= self.kv_budget

    # --- layer kinds ---------------------------------------------------------------------------------------------

    def set_layers(self, count: int, initial: bool = False) -> bool:
        """The policy's DSLA layers for new requests: the first `count` of the conversion order. Returns whether
        they changed (a switch, unless `initial`)."""
        layers = self.layers_of(count)
        if layers == self.layers:
            return False
        self.layers = layers
        if initial:
            return True
        self.layer_switches += 1
        self.metrics.inc("dsla:layer_switches_total")
        logger.info("DSLA layers: %d of %d (%s)", len(layers), self.num_layers, list(layers))
        return True

    def retarget(self, prefilling: list[Request], target: Callable[[Request], tuple[int, ...]]) -> None:
        """Give each request in flight the DSLA layers `target(request)` names. A request whose layers grow has its
        keys and values folded into its new layers' states (exact for the default preset); one whose layers shrink
        needs the keys and values of the layers it reverts (`keep_kv`): a running request that lost them keeps its
        layers until it leaves (a deferred decrease), a prefill that lost them starts again."""
        for request in prefilling:
            want = target(request)
            if request.cache is not None and want != request.dsla_layers:
                if self.revertible(request.cache, request.dsla_layers, want):
                    self.fold(request.cache, None, request.dsla_layers, want)
                else:
                    request.cache = None  # nothing was sent yet: prefill again
            request.dsla_layers = want
        for batch in list(self.batches):
            wants = [target(r) for r in batch.requests]
            if not self.revertible(batch.cache, batch.layers, *wants):
                self.deferred_decreases += 1
                wants = [w if self.revertible(batch.cache, batch.layers, w) else batch.layers for w in wants]
            if all(w == batch.layers for w in wants):
                continue
            self.batches.remove(batch)
            want_of = {id(r): w for r, w in zip(batch.requests, wants)}
            for want in dict.fromkeys(w for w in wants if w != batch.layers):
                part = batch.split([i for i, r in enumerate(batch.requests) if want_of[id(r)] == want])
                self.fold(part.cache, part.mask, part.layers, want)
                part.layers = want
                for request in part.requests:
                    request.dsla_layers = want
                self.add(part)
            if batch.requests:
                self.add(batch)

    @staticmethod
    def revertible(cache: DSLACache, current: tuple[int, ...], *wants: tuple[int, ...]) -> bool:
        """Whether the cache holds the keys and values of every layer of `current` that a `want` runs as softmax."""
        return cache.can_revert(sorted({i for want in wants for i in current if i not in want}))

    def fold(self, cache: DSLACache, mask: torch.Tensor | None, current: tuple[int, ...], want: tuple[int, ...]):
        """Fold the keys and values of the layers `want` adds to `current` into their states now (so that the
        cache holds the same kinds of state as the other caches of `want`, to stack with them)."""
        added = [i for i in want if i not in current]
        if added:
            self.model.fold_caches([(cache, mask)], added)

    def add(self, batch: Batch) -> None:
        """A batch joins the running batch of its layers (stacked: both caches copied once), or runs alone."""
        for other in self.batches:
            if other.layers == batch.layers:
                other.cache, other.mask = DSLACache.stack([other.cache, batch.cache], [other.mask, batch.mask])
                other.requests += batch.requests
                return
        self.batches.append(batch)

    # --- one step ------------------------------------------------------------------------------------------------

    def forward(self, groups: list[SequenceGroup]) -> list[torch.Tensor]:
        """One forward over the step's groups: each group's kept logits [rows, kept, vocab]."""
        return self.model.forward_groups(groups)

    def prefill_group(self, request: Request, budget: int) -> SequenceGroup:
        """The request's next prompt chunk: at most `budget` tokens, ending at the next multiple of the chunk size
        (where prefix-cache checkpoints are taken) or at the prompt's end. Starts its cache if it has none."""
        if request.cache is None:
            self.start_prefill(request)
        start, size = request.prefilled, self.config.prefill_chunk
        end = min(len(request.prompt_ids), (start // size + 1) * size, start + budget)
        ids = torch.tensor([request.prompt_ids[start:end]], dtype=torch.long, device=self.device)
        # Every position's logits only when the prompt is scored: the others pay for the last position's alone.
        keep = 1 if request.params.prompt_logprobs is None else 0
        return SequenceGroup(ids, request.cache, logits_to_keep=keep, dsla_layers=request.dsla_layers)

    def prefilled(self, request: Request, logits: torch.Tensor) -> torch.Tensor | None:
        """After the request's chunk ran (`logits` [1, kept, vocab]): its prompt logprobs and checkpoints. Returns
        the last position's logits (fp32, on the CPU) once the prompt is done, after its checkpoints went to the
        prefix cache; else None."""
        scored, layers = request.params.prompt_logprobs, request.dsla_layers
        start, size = request.prefilled, self.config.prefill_chunk
        end = request.cache.get_seq_length()
        if scored is not None:  # position i predicts prompt token i + 1 (the last one of the prompt: the output)
            targets = request.prompt_ids[start + 1 : end + 1]
            request.prompt_logprobs += token_logprobs(logits[0, : len(targets)], targets, scored)
        request.prefilled = end
        self.metrics.inc("vllm:prompt_tokens_total", end - start)
        if end < len(request.prompt_ids):
            if self.prefix_cache is not None and end % size == 0:
                request.checkpoints.append((layers, request.cache.checkpoint(keys_values=False)))
            return None
        if self.prefix_cache is not None:
            taken = [c for kinds, c in request.checkpoints if kinds == layers] + [request.cache.checkpoint()]
            self.prefix_cache.store(request.prompt_ids, layers, taken)
        request.checkpoints = []
        return logits[0, -1].float().cpu()

    def start_prefill(self, request: Request) -> None:
        """A fresh cache for the request: from the longest prefix in the prefix cache, or empty. Prompts whose
        logprobs are asked for start empty (every position's logits are needed)."""
        scored = request.params.prompt_logprobs
        request.checkpoints, request.cached_tokens = [], 0
        hit = None
        if self.prefix_cache is not None and scored is None:
            hit = self.prefix_cache.lookup(request.prompt_ids, request.dsla_layers)
            self.metrics.inc("vllm:prefix_cache_queries_total", len(request.prompt_ids))
        if hit is not None:
            request.cache, request.prefilled = DSLACache.from_checkpoint(hit), hit.tokens
            request.cached_tokens = hit.tokens
            self.metrics.inc("vllm:prefix_cache_hits_total", hit.tokens)
            return
        request.cache = DSLACache(self.model.config, keep_kv=self.config.keep_kv)
        request.prefilled = 0
        if scored is not None:
            request.prompt_logprobs = [TokenLogprob(request.prompt_ids[0], None, None)]

    def join(self, request: Request) -> None:
        """A prefilled request joins the running batch of its layers as its last row (left-padded)."""
        mask = torch.ones(1, request.cached, dtype=torch.long, device=self.device)
        self.add(Batch(request.dsla_layers, request.cache, mask, [request]))
        request.cache = None

    def decode_groups(self) -> list[tuple[Batch, SequenceGroup]]:
        """One token for each running request, by batch: its last output token, at its own position."""
        groups = []
        for batch in self.batches:
            running = batch.requests
            tokens = torch.tensor([[r.output_ids[-1]] for r in running], dtype=torch.long, device=self.device)
            positions = torch.tensor([[r.cached] for r in running], dtype=torch.long, device=self.device)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(running), 1)], 1)
            group = SequenceGroup(tokens, batch.cache, batch.mask, positions, dsla_layers=batch.layers)
            groups.append((batch, group))
        return groups

    def decoded(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """After a batch's decode tokens ran (`logits` [rows, 1, vocab]): the next token's logits [rows, vocab],
        fp32 on the CPU (sampled there, with each request's own generator)."""
        for request in batch.requests:
            request.cached += 1
        return logits[:, -1].float().cpu()

    def remove_finished(self) -> None:
        """Drop the finished requests' rows (those that ended normally leave their prompt and output in the prefix
        cache first), and batches left empty."""
        for batch in list(self.batches):
            keep = [i for i, r in enumerate(batch.requests) if r.finish_reason is None]
            if len(keep) == len(batch.requests):
                continue
            if self.prefix_cache is not None:
                for row, request in enumerate(batch.requests):
                    if request.finish_reason in ("stop", "length"):
                        self.store_conversation(batch, request, row)
            if keep:
                batch.keep(keep)
            else:
                self.batches.remove(batch)

    def store_conversation(self, batch: Batch, request: Request, row: int) -> None:
        """Keep what a finished request's row of its batch holds (its prompt and all but its last output token) in
        the prefix cache: a conversation's next turn resends both."""
        held = request.prompt_ids + request.output_ids[: request.cached - len(request.prompt_ids)]
        try:
            checkpoint = batch.cache.checkpoint(row=row, tokens=request.cached)
        except ValueError:  # a layer switched while it ran holds neither kind of state in full: nothing to keep
            return
        self.prefix_cache.store(held, batch.layers, [checkpoint])

    def reset(self) -> None:
        """Forget the running batches (after a failed step)."""
        self.batches = []


__all__ = ["Batch", "ModelRunner"]
