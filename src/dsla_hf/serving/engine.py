"""The engine: one thread owns the model and runs a loop of steps, in the three parts vLLM splits it into. Each step

1. the scheduler (`scheduler.py`) takes new and cancelled requests from thread-safe queues and ends requests past
   their deadline;
2. the policy says how many layers the load asks for, and each request's share of them: its own context length
   caps it (the poster's caps, per request; `AdaptivePolicy.request_layers`). The model runner (`model_runner.py`)
   gives every request in flight its layers: a request whose DSLA layers grow has its own keys and values folded
   into the new layers' states (exact for the default preset); one whose layers shrink needs the keys and values
   of the layers it reverts (`keep_kv`), so without them a running request keeps its layers until it leaves (a
   deferred decrease) and a prefill starts again;
3. the step's tokens are chosen under a budget of `max_num_batched_tokens` (vLLM's rule): one decode token for
   every running request first, then prompt chunks of the requests being prefilled, in arrival order, admitting
   waiting requests while the batch has room, the memory allows and tokens remain. A chunk ends at a multiple of
   `prefill_chunk` (where the prefix cache keeps checkpoints) and a prompt starts after its longest prefix in the
   prefix cache (`prefix_cache.py`);
4. the model runner runs all of it as one forward (`forward_groups`): running requests decode in one batch per
   set of DSLA layers (the paper's mixed batches), each batch and each prompt chunk attend in their own caches
   with their own layer kinds, and all share every layer's MLP, so decoding never waits for a prompt chunk of its
   own. The output processor (`output_processor.py`) samples each request with its own parameters. A prompt that
   is done samples its first token (or ends, with `max_tokens=0`) and joins the batch of its layers
   (`DSLACache.stack`, left-padded); finished rows leave (their prompt and output kept in the prefix cache).

Each request records the DSLA layers of every output token (`Request.modes`, in the response's
`usage.dsla_modes`). Nothing here logs prompt text or tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.dsla.modeling_dsla import SequenceGroup
from .metrics import Metrics
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .policy import LoadSnapshot, StaticPolicy
from .request import Output, Request
from .sampling import Detokenizer, SamplingParams
from .scheduler import QueueFull, Scheduler

logger = logging.getLogger(__name__)


class EngineStopped(Exception):
    """The engine is not running (HTTP 503)."""


@dataclass
class EngineConfig:
    """Args:
    max_num_seqs: requests in flight at most (running plus being prefilled).
    max_queue: waiting requests at most; more are refused (QueueFull).
    max_model_len: prompt plus output tokens at most (default: the model's `max_position_embeddings`).
    prefill_chunk: prompt chunks end at its multiples (where the prefix cache keeps checkpoints): a prompt takes
        at most this many tokens of a step.
    max_num_batched_tokens: tokens per step at most, decode tokens first, prompt chunks after (default:
        `prefill_chunk + max_num_seqs`, so a whole chunk fits beside a full batch's decode tokens).
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
    max_num_batched_tokens: int | None = None
    request_timeout_s: float | None = 600.0
    kv_cache_bytes: int | None = None
    keep_kv: bool = False
    enable_prefix_caching: bool = True
    prefix_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.prefill_chunk < 1:
            raise ValueError("max_num_seqs and prefill_chunk must be at least 1")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = self.prefill_chunk + self.max_num_seqs
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed max_num_seqs "
                f"({self.max_num_seqs}): a full batch's decode tokens would leave no prompt any token of a step"
            )


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, policy=None, metrics=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.policy = policy or StaticPolicy(len(model.config.active_dsla_layers))
        self.num_layers = model.config.num_hidden_layers
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        self.metrics = metrics or Metrics("model")
        eos = set()
        for source in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(model.generation_config, "eos_token_id", None),
        ):
            eos.update([source] if isinstance(source, int) else source or [])
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_queue)
        self.runner = ModelRunner(self.model, self.config, self.max_model_len, self.metrics)
        self.output = OutputProcessor(sorted(eos), self.max_model_len, self.metrics, self.config.request_timeout_s)
        self.steps = 0
        self.count = 0  # DSLA layers the load asks for (each request gets its share: `target_layers`)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.count = self.policy.decide(self.snapshot(), time.monotonic())
        self.runner.set_layers(self.count, initial=True)
        self.policy.commit(time.monotonic())

    # --- public API (any thread) ----------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="dsla-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet being prefilled (those still in the inbox included)."""
        return self.scheduler.num_waiting

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
        try:
            self.scheduler.add(request)
        except QueueFull:
            self.metrics.inc("dsla:requests_rejected_total")
            raise
        return request

    # What the parts hold, for callers that watch the engine (tests, benchmarks, the server's idle check).
    running = property(lambda self: self.scheduler.running)
    prefilling = property(lambda self: self.scheduler.prefilling)
    cache = property(lambda self: self.runner.cache)
    batches = property(lambda self: self.runner.batches)
    layer_switches = property(lambda self: self.runner.layer_switches)
    deferred_decreases = property(lambda self: self.runner.deferred_decreases)
    tokens_by_layers = property(lambda self: self.output.tokens_by_layers)

    # --- the loop (engine thread) ------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if self.scheduler.idle:
                self.scheduler.wait(0.05)
                continue
            try:
                self.step()
            except Exception as error:  # a bug or out of memory: fail the requests in flight, keep serving
                logger.exception("Engine step failed; ending the requests in flight")
                message = f"Internal engine error: {type(error).__name__}"
                for request in self.scheduler.in_flight():
                    self.output.finish(request, "error", error=message)
                self.scheduler.running, self.scheduler.prefilling = [], []
                self.runner.reset()
        for request in list(self.scheduler.waiting) + self.scheduler.in_flight():
            self.output.finish(request, "abort", error="The server is shutting down")

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: intake, deadlines, policy (each request's layer kinds), one forward over the running
        batches' decode tokens and the prompt chunks that fit the token budget, sampling, removal of finished rows."""
        now = time.monotonic()
        scheduler = self.scheduler
        scheduler.intake()
        for request, reason in scheduler.ended(now):
            self.output.finish(request, reason)
        self._remove_finished()
        self.count = self.policy.decide(self.snapshot(), now)
        self.runner.set_layers(self.count)
        self.policy.commit(now)
        self.runner.retarget(scheduler.prefilling, self.target_layers)
        decoding = self.runner.decode_groups()
        chunks = self._prefill_chunks(self.config.max_num_batched_tokens - len(scheduler.running))
        groups = [group for _, group in decoding + chunks]
        if groups:
            logits = self.runner.forward(groups)
            for (batch, _), batch_logits in zip(decoding, logits):
                for request, row in zip(batch.requests, self.runner.decoded(batch, batch_logits)):
                    self.output.accept(request, row, batch.layers)
            for (request, _), chunk_logits in zip(chunks, logits[len(decoding) :]):
                self._prefilled(request, chunk_logits)
        self._remove_finished()
        self.steps += 1
        self._update_gauges()

    def target_layers(self, request: Request) -> tuple[int, ...]:
        """The DSLA layers a request should run now: the policy's share for its context length (the poster's
        caps per request) of the layers the load asks for."""
        tokens = request.cached if request.output_ids else len(request.prompt_ids)
        return self.runner.layers_of(self.policy.request_layers(self.count, tokens))

    def _prefill_chunks(self, budget: int) -> list[tuple[Request, SequenceGroup]]:
        """The prompt chunks of this step, within `budget` tokens: those of requests being prefilled, then of
        waiting requests admitted while tokens remain."""
        scheduler, chunks = self.scheduler, []
        pending = iter(list(scheduler.prefilling))
        fits = lambda request: self.runner.fits(request, scheduler.prefilling)  # noqa: E731
        while budget > 0:
            request = next(pending, None)
            if request is None:
                request = scheduler.admit(fits)
                if request is None:
                    break
                request.dsla_layers = self.target_layers(request)
            group = self.runner.prefill_group(request, budget)
            chunks.append((request, group))
            budget -= group.input_ids.shape[1]
        return chunks

    def _prefilled(self, request: Request, logits: torch.Tensor) -> None:
        """After a request's prompt chunk ran: once its prompt is done, its first token (and its row in the batch)."""
        last = self.runner.prefilled(request, logits)
        if last is None:  # more chunks to come
            return
        request.cached = len(request.prompt_ids)
        if request.params.max_tokens == 0:  # the prompt scored, nothing to generate
            self.scheduler.prefilling.remove(request)
            request.cache = None
            self.output.finish(request, "length")
            return
        # Still prefilling while its first token is sampled: if that fails, the step's failure handler ends it.
        self.output.accept(request, last, request.dsla_layers)
        self.scheduler.prefilling.remove(request)
        if request.finish_reason is not None:
            request.cache = None
            return
        self.runner.join(request)
        self.scheduler.running.append(request)

    def snapshot(self) -> LoadSnapshot:
        """The load the policy decides on."""
        scheduler = self.scheduler
        return LoadSnapshot(
            num_waiting=scheduler.queued_now(),
            num_running=len(scheduler.in_flight()),
            kv_usage=self.kv_usage(),
            prompt_tokens=scheduler.prompt_lengths(),
        )

    def kv_usage(self) -> float:
        """The memory the running batches and the prefills in progress take, as a fraction of the KV budget."""
        return self.runner.kv_bytes(self.scheduler.prefilling) / self.runner.kv_budget

    def _remove_finished(self) -> None:
        self.runner.remove_finished()
        self.scheduler.running = [r for r in self.scheduler.running if r.finish_reason is None]

    def _update_gauges(self) -> None:
        m = self.metrics
        m.set("vllm:num_requests_running", len(self.scheduler.in_flight()))
        m.set("vllm:num_requests_waiting", self.scheduler.queued_now())
        m.set(
            "vllm:kv_cache_usage_perc",
            min(1.0, self.runner.kv_bytes(self.scheduler.prefilling) / self.runner.kv_budget),
        )
        layers = len(self.runner.layers)
        m.set("dsla:num_dsla_layers", layers)
        m.set("dsla:conversion_ratio", layers / self.num_layers)


__all__ = ["Engine", "EngineConfig", "EngineStopped", "Output", "QueueFull", "Request"]
