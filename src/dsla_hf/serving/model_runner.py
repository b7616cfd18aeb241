"""What runs the model: one forward per step over groups of rows that each have their own cache (the running
batch's decode tokens, left-padded rows joined with `DSLACache.stack` and left with `batch_select_indices` and
`trim_left`; and a prompt chunk of each request being prefilled, in its own cache), the switches of layer kinds
(caches in flight folded at once), the prefix cache, and the memory all of it takes."""

from __future__ import annotations

import logging

import torch

from ..models.dsla.cache_dsla import DSLACache
from ..models.dsla.modeling_dsla import SequenceGroup
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .request import Request
from .sampling import TokenLogprob, token_logprobs

logger = logging.getLogger(__name__)


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
        self.cache: DSLACache | None = None  # the running batch's
        self.mask: torch.Tensor | None = None  # its 2-D padding mask
        self.layer_switches = 0
        self.deferred_decreases = 0

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers that run as DSLA now."""
        return tuple(self.model.config.active_dsla_layers)

    # --- memory --------------------------------------------------------------------------------------------------

    def kv_bytes(self, prefilling: list[Request] = ()) -> int:
        """The bytes the running batch's cache and the prefilling requests' caches take now."""
        total = self.cache.memory_bytes if self.cache is not None else 0
        return total + sum(r.cache.memory_bytes for r in prefilling if r.cache is not None)

    def kv_need(self, request: Request) -> int:
        """The keys and values a request's prompt and output take in the softmax layers, at most."""
        softmax_layers = self.num_layers - len(self.layers)
        return (len(request.prompt_ids) + request.params.max_tokens) * softmax_layers * self.kv_bytes_per_token_layer

    def fits(self, request: Request, prefilling: list[Request] = ()) -> bool:
        """Whether a waiting request's keys and values fit the budget beside the running batch's and what the
        requests being prefilled will take once their prompts are done."""
        reserved = sum(self.kv_need(r) for r in prefilling)
        return self.kv_bytes() + reserved + self.kv_need(request) <= self.kv_budget

    # --- layer kinds ---------------------------------------------------------------------------------------------

    def set_layers(self, count: int, prefilling: list[Request] = (), force: bool = False) -> bool:
        """Run the first `count` layers of the conversion order as DSLA. Returns whether the model now has them:
        a decrease waits while running requests lost the keys and values of the layers it reverts (a prefill that
        lost them starts again)."""
        order = self.model.config.conversion_order
        count = max(0, min(count, len(order)))
        target = sorted(order[:count])
        current = self.model.config.active_dsla_layers
        if target == current:
            return True
        reverted = [i for i in current if i not in target]
        if reverted and not force:
            if self.cache is not None and not self.cache.can_revert(reverted):
                self.deferred_decreases += 1
                return False  # requests in flight lost these keys and values: wait until they leave
            for request in prefilling:
                if request.cache is not None and not request.cache.can_revert(reverted):
                    request.cache = None  # nothing was sent yet: prefill again
        # Caches in flight are folded now, so that each holds the same kind of state per layer (to stack them).
        in_flight = [(self.cache, self.mask)] if self.cache is not None else []
        in_flight += [r.cache for r in prefilling if r.cache is not None]
        self.model.set_dsla_layers(target, caches=in_flight)
        if not force:
            self.layer_switches += 1
            self.metrics.inc("dsla:layer_switches_total")
        logger.info("DSLA layers: %d of %d (%s)", len(target), self.num_layers, target)
        return True

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
        return SequenceGroup(ids, request.cache, logits_to_keep=1 if request.params.prompt_logprobs is None else 0)

    def prefilled(self, request: Request, logits: torch.Tensor) -> torch.Tensor | None:
        """After the request's chunk ran (`logits` [1, kept, vocab]): its prompt logprobs and checkpoints. Returns
        the last position's logits (fp32, on the CPU) once the prompt is done, after its checkpoints went to the
        prefix cache; else None."""
        scored, layers = request.params.prompt_logprobs, self.layers
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
            hit = self.prefix_cache.lookup(request.prompt_ids, self.layers)
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
        """Add a prefilled request's cache to the running batch as its last row (left-padded)."""
        if self.cache is None:
            self.cache, self.mask = request.cache, torch.ones(1, request.cached, dtype=torch.long, device=self.device)
        else:
            self.cache, self.mask = DSLACache.stack([self.cache, request.cache], [self.mask, None])
        request.cache = None

    def decode_group(self, running: list[Request]) -> SequenceGroup:
        """One token for each row of the batch: each request's last output token, at its own position."""
        batch = len(running)
        tokens = torch.tensor([[r.output_ids[-1]] for r in running], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.cached] for r in running], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], 1)
        return SequenceGroup(tokens, self.cache, attention_mask=self.mask, position_ids=positions)

    def decoded(self, running: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """After the batch's decode tokens ran (`logits` [rows, 1, vocab]): the next token's logits [rows, vocab],
        fp32 on the CPU (sampled there, with each request's own generator)."""
        for request in running:
            request.cached += 1
        return logits[:, -1].float().cpu()

    def remove(self, running: list[Request], keep: list[int]) -> None:
        """Drop the rows of the batch not in `keep` (the finished requests'; those that ended normally leave their
        prompt and output in the prefix cache first) and the columns that are then padding in every row."""
        if self.prefix_cache is not None:
            for row, request in enumerate(running):
                if request.finish_reason in ("stop", "length"):
                    self.store_conversation(request, row)
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        leading = int((self.mask.cumsum(1) == 0).all(0).sum())
        if leading:
            self.cache.trim_left(leading)
            self.mask = self.mask[:, leading:]

    def store_conversation(self, request: Request, row: int) -> None:
        """Keep what a finished request's row of the batch cache holds (its prompt and all but its last output
        token) in the prefix cache: a conversation's next turn resends both."""
        held = request.prompt_ids + request.output_ids[: request.cached - len(request.prompt_ids)]
        try:
            checkpoint = self.cache.checkpoint(row=row, tokens=request.cached)
        except ValueError:  # a layer switched while it ran holds neither kind of state in full: nothing to keep
            return
        self.prefix_cache.store(held, self.layers, [checkpoint])

    def reset(self) -> None:
        """Forget the running batch (after a failed step)."""
        self.cache, self.mask = None, None


__all__ = ["ModelRunner"]
