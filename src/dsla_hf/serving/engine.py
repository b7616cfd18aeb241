"""The engine: one thread owns the model and runs a loop of steps; each step

1. takes new and cancelled requests from thread-safe queues, and ends requests past their deadline;
2. asks the policy how many layers should run as DSLA and switches between two forwards only: layers that become
   DSLA have the keys and values of every request in flight folded into states at once (exact for the default
   preset); a layer returns to softmax attention only when every request in flight still has its keys and values
   (otherwise the decrease waits, and prefills that lost them restart);
3. prefills at most `prefill_chunk` tokens of one waiting request in its own cache (chunked prefill, chunks ending
   at multiples of `prefill_chunk`; the logits of every position only when the request asks for its prompt's
   logprobs), starting after the longest prefix of its prompt in the prefix cache (`prefix_cache.py`), and when the
   prompt is done stores its checkpoints there, samples its first token (or ends, with `max_tokens=0`) and joins
   its cache to the running batch with `DSLACache.stack` (left-padded; the batch is never drained for it);
4. runs one decode step for the whole running batch (one token per request, explicit positions, 2-D padding mask),
   samples each request with its own parameters, and removes finished requests (`batch_select_indices`, then
   `trim_left` of the columns that are padding in every remaining row).

All requests of the batch share the model's current layer kinds, which each request records per token
(`Request.modes`). Nothing here logs prompt text or tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.dsla.cache_dsla import CacheCheckpoint, DSLACache
from .metrics import Metrics
from .policy import LoadSnapshot, StaticPolicy
from .prefix_cache import PrefixCache
from .sampling import Detokenizer, SamplingParams, TokenLogprob, sample, token_logprobs

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is not running (HTTP 503)."""


@dataclass
class Output:
    """One message from the engine to a request's consumer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", "timeout", "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of `token_ids`, when the request asks for them
    prompt_logprobs: list[TokenLogprob] | None = None  # of every prompt token, with the request's first output
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (with the last output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineConfig:
    """Args:
    max_num_seqs: requests decoded together at most (running plus the one being prefilled).
    max_queue: waiting requests at most; more are refused (QueueFull).
    max_model_len: prompt plus output tokens at most (default: the model's `max_position_embeddings`).
    prefill_chunk: prompt tokens prefilled per step (chunked prefill keeps decode steps going meanwhile).
    request_timeout_s: a request still unfinished after this long ends with finish_reason "timeout".
    kv_cache_bytes: the KV budget that `kv_usage` is a fraction of; also bounds admission (default: what
        `max_num_seqs` requests of `max_model_len` tokens take with every layer as softmax attention).
    keep_kv: keep keys and values of DSLA layers, so decreases are never deferred (and no memory is saved).
    enable_prefix_caching: start prompts after the longest prefix served before (vLLM's automatic prefix caching).
    prefix_cache_bytes: memory of the prefix cache (default: a quarter of `kv_cache_bytes`).
    """

    max_num_seqs: int = 8
    max_queue: int = 128
    max_model_len: int | None = None
    prefill_chunk: int = 512
    request_timeout_s: float | None = 600.0
    kv_cache_bytes: int | None = None
    keep_kv: bool = False
    enable_prefix_caching: bool = True
    prefix_cache_bytes: int | None = None


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None], detok):
        self.id = uuid.uuid4().hex
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.detok = detok
        self.generator = params.generator()
        self.output_ids: list[int] = []
        self.arrival = time.monotonic()
        self.deadline: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.cache: DSLACache | None = None  # own cache while prefilling
        self.prefilled = 0  # prompt tokens in `cache`
        self.cached_tokens = 0  # of them, those from the prefix cache
        self.checkpoints: list[tuple[tuple[int, ...], CacheCheckpoint]] = []  # (DSLA layers, checkpoint) by chunk
        self.cached = 0  # real tokens in the cache (prompt plus fed outputs): the next position
        # (index of the first output token produced with these layers, DSLA layers): the per-token layer modes.
        self.modes: list[tuple[int, tuple[int, ...]]] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None  # filled while prefilling, when asked for

    def cancel(self) -> None:
        self.cancelled.set()

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs, once (they go with the first output)."""
        scored, self.prompt_logprobs = self.prompt_logprobs, None
        return scored

    def dsla_layers_at(self, index: int) -> tuple[int, ...]:
        """The DSLA layers of the forward that produced output token `index` (every other layer was softmax)."""
        current: tuple[int, ...] = ()
        for start, layers in self.modes:
            if start <= index:
                current = layers
        return current


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, policy=None, metrics=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.policy = policy or StaticPolicy(len(model.config.active_dsla_layers))
        text_config = model.config
        self.num_layers = text_config.num_hidden_layers
        self.max_model_len = self.config.max_model_len or text_config.max_position_embeddings
        self.metrics = metrics or Metrics("model")
        eos = set()
        for source in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(model.generation_config, "eos_token_id", None),
        ):
            eos.update([source] if isinstance(source, int) else source or [])
        self.eos_ids = sorted(eos)
        # Requests' tensors live where the model's weights are; keys and values take the bytes of its dtype.
        self.device = model.device
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        element = torch.empty((), dtype=model.dtype).element_size()
        self.kv_bytes_per_token_layer = 2 * text_config.num_key_value_heads * head_dim * element
        self.kv_budget = self.config.kv_cache_bytes or (
            self.config.max_num_seqs * self.max_model_len * self.kv_bytes_per_token_layer * self.num_layers
        )
        self.prefix_cache = None
        if self.config.enable_prefix_caching:
            capacity = self.config.prefix_cache_bytes
            self.prefix_cache = PrefixCache(self.kv_budget // 4 if capacity is None else capacity)
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._waiting_count = 0  # waiting requests including those still in the inbox (guarded by _lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.prefilling: Request | None = None
        self.running: list[Request] = []
        self.cache: DSLACache | None = None
        self.mask: torch.Tensor | None = None
        self.layer_switches = 0
        self.steps = 0
        self.deferred_decreases = 0
        self.tokens_by_layers: dict[int, int] = {}  # output tokens produced with this many DSLA layers
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._set_layers(self.policy.decide(self._snapshot(), time.monotonic()), force=True)
        self.policy.commit(time.monotonic())

    # --- public API (any thread) ----------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="dsla-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet being prefilled (those still in the inbox included)."""
        with self._lock:
            return self._waiting_count

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the prompt is empty, does not fit the context or has ids outside the vocabulary."""
        if not prompt_ids:
            raise ValueError("The prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or the completion."
            )
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"Prompt token ids must be in [0, {vocab})")

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None]) -> Request:
        """Queue a request; `sink` receives its outputs (from the engine thread). Raises ValueError as
        `check_prompt`, QueueFull when the queue is full, EngineStopped when the engine is not running."""
        if self._stop.is_set():
            raise EngineStopped("The engine is stopped")
        self.check_prompt(prompt_ids, params)
        request = Request(prompt_ids, params, sink, Detokenizer(self.tokenizer, params.stop))
        if self.config.request_timeout_s is not None:
            request.deadline = request.arrival + self.config.request_timeout_s
        with self._lock:
            if self._waiting_count >= self.config.max_queue:
                self.metrics.inc("dsla:requests_rejected_total")
                raise QueueFull(f"The server is busy: {self._waiting_count} requests are waiting; retry later")
            self._waiting_count += 1
        self._inbox.put(request)
        self._wake.set()
        return request

    # --- the loop (engine thread) ------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not (self.running or self.prefilling or self._waiting) and self._inbox.empty():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a bug or out of memory: fail the requests in flight, keep serving
                logger.exception("Engine step failed; ending the requests in flight")
                message = f"Internal engine error: {type(error).__name__}"
                for request in self.running + ([self.prefilling] if self.prefilling else []):
                    self._finish(request, "error", error=message)
                self.running, self.prefilling, self.cache, self.mask = [], None, None, None
        for request in list(self._waiting) + self.running + ([self.prefilling] if self.prefilling else []):
            self._finish(request, "abort", error="The server is shutting down")

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: intake, deadlines, policy (switch), prefill chunk, one batched decode step."""
        now = time.monotonic()
        self._intake()
        self._reap(now)
        self._apply_policy(now)
        self._prefill()
        if self.running:
            self._decode()
        self._remove_finished()
        self.steps += 1
        self._update_gauges()

    def _intake(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _dequeue(self, request: Request) -> None:
        with self._lock:
            self._waiting_count -= 1

    def _reap(self, now: float) -> None:
        for request in list(self._waiting):
            reason = self._ended(request, now)
            if reason:
                self._waiting.remove(request)
                self._dequeue(request)
                self._finish(request, reason)
        if self.prefilling is not None:
            reason = self._ended(self.prefilling, now)
            if reason:
                self._finish(self.prefilling, reason)
                self.prefilling = None
        for request in self.running:
            reason = self._ended(request, now)
            if reason and request.finish_reason is None:
                self._finish(request, reason)
        self._remove_finished()

    @staticmethod
    def _ended(request: Request, now: float) -> str | None:
        if request.cancelled.is_set():
            return "abort"
        if request.deadline is not None and now > request.deadline:
            return "timeout"
        return None

    # --- policy and switching ------------------------------------------------------------------------------------

    def _snapshot(self) -> LoadSnapshot:
        prompts = [len(r.prompt_ids) for r in self._waiting] + [r.cached for r in self.running]
        if self.prefilling is not None:
            prompts.append(len(self.prefilling.prompt_ids))
        return LoadSnapshot(
            num_waiting=len(self._waiting) + self._inbox.qsize(),
            num_running=len(self.running) + (self.prefilling is not None),
            kv_usage=self.kv_bytes() / self.kv_budget,
            prompt_tokens=prompts,
        )

    def kv_bytes(self) -> int:
        total = self.cache.memory_bytes if self.cache is not None else 0
        if self.prefilling is not None and self.prefilling.cache is not None:
            total += self.prefilling.cache.memory_bytes
        return total

    def _apply_policy(self, now: float) -> None:
        count = self.policy.decide(self._snapshot(), now)
        if self._set_layers(count):
            self.policy.commit(now)

    def _set_layers(self, count: int, force: bool = False) -> bool:
        """Run the first `count` layers of the conversion order as DSLA. Returns whether the model now has them."""
        order = self.model.config.conversion_order
        count = max(0, min(count, len(order)))
        target = sorted(order[:count])
        current = self.model.config.active_dsla_layers
        if target == current:
            return True
        reverted = [i for i in current if i not in target]
        prefill = self.prefilling
        if reverted and not force:
            if self.cache is not None and not self.cache.can_revert(reverted):
                self.deferred_decreases += 1
                return False  # requests in flight lost these keys and values: wait until they leave
            if prefill is not None and prefill.cache is not None and not prefill.cache.can_revert(reverted):
                prefill.cache = None  # nothing was sent yet: prefill again
        # Caches in flight are folded now, so that each holds the same kind of state per layer (to stack them).
        in_flight = [(self.cache, self.mask)] if self.cache is not None else []
        if prefill is not None and prefill.cache is not None:
            in_flight.append(prefill.cache)
        self.model.set_dsla_layers(target, caches=in_flight)
        if not force:
            self.layer_switches += 1
            self.metrics.inc("dsla:layer_switches_total")
        logger.info("DSLA layers: %d of %d (%s)", len(target), self.num_layers, target)
        return True

    # --- prefill -------------------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        if self.prefilling is None:
            if not self._waiting or len(self.running) >= self.config.max_num_seqs:
                return
            request = self._waiting[0]
            softmax_layers = self.num_layers - len(self.model.config.active_dsla_layers)
            need = (
                (len(request.prompt_ids) + request.params.max_tokens) * softmax_layers * self.kv_bytes_per_token_layer
            )
            if self.running and self.kv_bytes() + need > self.kv_budget:
                return  # wait for memory (requests in flight finish, or more layers become DSLA)
            self._waiting.popleft()
            self._dequeue(request)
            self.prefilling = request
        request = self.prefilling
        scored = request.params.prompt_logprobs
        layers = tuple(self.model.config.active_dsla_layers)
        if request.cache is None:
            self._start_prefill(request, layers)
        start, size = request.prefilled, self.config.prefill_chunk
        chunk = request.prompt_ids[start : (start // size + 1) * size]  # chunks end at multiples of the chunk size
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        # Every position's logits only when the prompt is scored: the others pay for the last position's alone.
        logits = self.model(ids, cache=request.cache, logits_to_keep=1 if scored is None else 0, use_cache=True).logits
        if scored is not None:  # position i predicts prompt token i + 1 (the last one of the prompt: the output)
            targets = request.prompt_ids[start + 1 : start + len(chunk) + 1]
            request.prompt_logprobs += token_logprobs(logits[0, : len(targets)], targets, scored)
        request.prefilled += len(chunk)
        self.metrics.inc("vllm:prompt_tokens_total", len(chunk))
        if request.prefilled < len(request.prompt_ids):
            if self.prefix_cache is not None and request.prefilled % size == 0:
                request.checkpoints.append((layers, request.cache.checkpoint(keys_values=False)))
            return
        request.cached = len(request.prompt_ids)
        if self.prefix_cache is not None:
            taken = [c for kinds, c in request.checkpoints if kinds == layers] + [request.cache.checkpoint()]
            self.prefix_cache.store(request.prompt_ids, layers, taken)
        request.checkpoints = []
        if request.params.max_tokens == 0:  # the prompt scored, nothing to generate
            self.prefilling, request.cache = None, None
            self._finish(request, "length")
            return
        # Still `prefilling` while its first token is sampled: if that fails, the step's failure handler ends it.
        self._accept(request, logits[0, -1].float().cpu())
        self.prefilling = None
        if request.finish_reason is not None:
            request.cache = None
            return
        if self.cache is None:
            self.cache, self.mask = request.cache, torch.ones(1, request.cached, dtype=torch.long, device=self.device)
        else:
            self.cache, self.mask = DSLACache.stack([self.cache, request.cache], [self.mask, None])
        request.cache = None
        self.running.append(request)

    def _start_prefill(self, request: Request, layers: tuple[int, ...]) -> None:
        """A fresh cache for the request: from the longest prefix in the prefix cache, or empty. Prompts whose
        logprobs are asked for start empty (every position's logits are needed)."""
        scored = request.params.prompt_logprobs
        request.checkpoints, request.cached_tokens = [], 0
        hit = None
        if self.prefix_cache is not None and scored is None:
            hit = self.prefix_cache.lookup(request.prompt_ids, layers)
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

    # --- decode --------------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        batch = len(self.running)
        tokens = torch.tensor([[r.output_ids[-1]] for r in self.running], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.cached] for r in self.running], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], 1)
        logits = self.model(
            tokens, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True
        ).logits[:, -1]
        logits = logits.float().cpu()  # sampled on the CPU, with each request's own generator: one copy per step
        for row, request in enumerate(self.running):
            request.cached += 1
            self._accept(request, logits[row])

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the next token of a request, send its text, and decide whether it is finished."""
        params = request.params
        logits = logits.float()
        masked = logits
        if len(request.output_ids) < params.min_tokens and self.eos_ids:
            masked = logits.clone()
            masked[self.eos_ids] = float("-inf")
        token = sample(masked, params, request.generator)
        # Of the model's own distribution (before min_tokens, temperature, top-p); nothing to pay when not asked.
        scored = None if params.logprobs is None else token_logprobs(logits[None], [token], params.logprobs)
        self._record_token(request, token)
        count = len(request.output_ids)
        past_min = count >= params.min_tokens
        reason = None
        if token in self.eos_ids and not params.ignore_eos and past_min:
            reason = "stop"  # the end of sequence has no text
        text, hit = request.detok.update([] if reason else [token], check_stop=past_min)
        if hit:
            reason = "stop"
        elif reason is None and (count >= params.max_tokens or request.cached + 1 >= self.max_model_len):
            reason = "length"
        if reason is None:
            prompt = request.take_prompt_logprobs()
            request.sink(Output(text=text, token_ids=[token], logprobs=scored, prompt_logprobs=prompt))
            return
        self._finish(request, reason, text_before=text, last_token=token, logprobs=scored)

    def _record_token(self, request: Request, token: int) -> None:
        """Append a sampled token to its request, with the layer kinds that produced it and its latency metrics."""
        now = time.monotonic()
        index = len(request.output_ids)
        layers = tuple(self.model.config.active_dsla_layers)
        if not request.modes or request.modes[-1][1] != layers:
            request.modes.append((index, layers))
        self.tokens_by_layers[len(layers)] = self.tokens_by_layers.get(len(layers), 0) + 1
        request.output_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe("vllm:time_to_first_token_seconds", now - request.arrival)
        else:
            self.metrics.observe("vllm:inter_token_latency_seconds", now - request.last_token_time)
        request.last_token_time = now
        self.metrics.inc("vllm:generation_tokens_total")

    def _finish(
        self,
        request: Request,
        reason: str,
        error: str | None = None,
        text_before: str = "",
        last_token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        text = text_before + (request.detok.flush() if reason in ("stop", "length") else "")
        now = time.monotonic()
        if reason in ("stop", "length"):
            self.metrics.inc("vllm:request_success_total", finished_reason=reason)
            self.metrics.observe("vllm:e2e_request_latency_seconds", now - request.arrival)
            if len(request.output_ids) > 1:
                tpot = (now - request.first_token_time) / (len(request.output_ids) - 1)
                self.metrics.observe("vllm:time_per_output_token_seconds", tpot)
        if reason == "timeout" and error is None:
            error = f"The request timed out after {self.config.request_timeout_s} s"
        try:
            request.sink(
                Output(
                    text=text,
                    token_ids=[last_token] if last_token is not None else [],
                    finish_reason=reason,
                    error=error,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=len(request.output_ids),
                    cached_tokens=request.cached_tokens,
                    logprobs=logprobs,
                    prompt_logprobs=request.take_prompt_logprobs(),
                )
            )
        except Exception:  # a consumer that went away must not stop the engine
            logger.debug("A request's consumer failed", exc_info=True)

    def _remove_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None]
        if len(keep) == len(self.running):
            return
        if self.prefix_cache is not None:
            for row, request in enumerate(self.running):
                if request.finish_reason in ("stop", "length"):
                    self._store_conversation(request, row)
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        leading = int((self.mask.cumsum(1) == 0).all(0).sum())
        if leading:
            self.cache.trim_left(leading)
            self.mask = self.mask[:, leading:]

    def _store_conversation(self, request: Request, row: int) -> None:
        """Keep what a finished request's row of the batch cache holds (its prompt and all but its last output
        token) in the prefix cache: a conversation's next turn resends both."""
        held = request.prompt_ids + request.output_ids[: request.cached - len(request.prompt_ids)]
        try:
            checkpoint = self.cache.checkpoint(row=row, tokens=request.cached)
        except ValueError:  # a layer switched while it ran holds neither kind of state in full: nothing to keep
            return
        self.prefix_cache.store(held, tuple(self.model.config.active_dsla_layers), [checkpoint])

    def _update_gauges(self) -> None:
        m = self.metrics
        m.set("vllm:num_requests_running", len(self.running) + (self.prefilling is not None))
        m.set("vllm:num_requests_waiting", len(self._waiting) + self._inbox.qsize())
        m.set("vllm:kv_cache_usage_perc", min(1.0, self.kv_bytes() / self.kv_budget))
        layers = len(self.model.config.active_dsla_layers)
        m.set("dsla:num_dsla_layers", layers)
        m.set("dsla:conversion_ratio", layers / self.num_layers)


__all__ = ["Engine", "EngineConfig", "EngineStopped", "Output", "QueueFull", "Request"]
