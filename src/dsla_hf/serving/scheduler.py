"""Which request runs when: the waiting queue (fed from any thread, bounded), deadlines and cancellations, and
admission to prefill (several requests at once, in arrival order, while the batch has room and the memory allows);
prefilled requests join the running batch."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

from .request import Request


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class Scheduler:
    """Args:
    max_num_seqs: requests in flight at most (running plus being prefilled).
    max_queue: waiting requests at most; more are refused (QueueFull).
    """

    def __init__(self, max_num_seqs: int, max_queue: int):
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not done yet, in arrival order
        self.running: list[Request] = []  # in the order of the running batch's rows
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._waiting_count = 0  # waiting requests including those still in the inbox (guarded by _lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # --- any thread ------------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request, or raise QueueFull."""
        with self._lock:
            if self._waiting_count >= self.max_queue:
                raise QueueFull(f"The server is busy: {self._waiting_count} requests are waiting; retry later")
            self._waiting_count += 1
        self._inbox.put(request)
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet being prefilled (those still in the inbox included)."""
        with self._lock:
            return self._waiting_count

    def wake(self) -> None:
        self._wake.set()

    # --- the engine thread -----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not (self.running or self.prefilling or self.waiting) and self._inbox.empty()

    def wait(self, timeout: float) -> None:
        """Sleep until a request arrives (or `timeout` seconds)."""
        self._wake.wait(timeout)
        self._wake.clear()

    def intake(self) -> None:
        while True:
            try:
                self.waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def ended(self, now: float) -> list[tuple[Request, str]]:
        """Requests cancelled or past their deadline, with the reason ("abort", "timeout"); those waiting or being
        prefilled leave the scheduler now, running ones when the engine removes finished rows."""
        out = []
        for request in list(self.waiting):
            reason = end_reason(request, now)
            if reason:
                self.waiting.remove(request)
                self._dequeued()
                out.append((request, reason))
        for request in list(self.prefilling):
            if reason := end_reason(request, now):
                self.prefilling.remove(request)
                out.append((request, reason))
        out += [(r, reason) for r in self.running if r.finish_reason is None and (reason := end_reason(r, now))]
        return out

    def admit(self, fits: Callable[[Request], bool]) -> Request | None:
        """Start prefilling the next waiting request, when the batch has room and `fits(request)` says the memory
        takes it (always, with nothing in flight). Returns it, or None."""
        if not self.waiting or len(self.running) + len(self.prefilling) >= self.max_num_seqs:
            return None
        if self.in_flight() and not fits(self.waiting[0]):
            return None
        request = self.waiting.popleft()
        self._dequeued()
        self.prefilling.append(request)
        return request

    def in_flight(self) -> list[Request]:
        return self.running + self.prefilling

    def prompt_lengths(self) -> list[int]:
        """The tokens of each request's context, as the policy sees them (waiting, running, being prefilled)."""
        lengths = [len(r.prompt_ids) for r in self.waiting] + [r.cached for r in self.running]
        return lengths + [len(r.prompt_ids) for r in self.prefilling]

    def queued_now(self) -> int:
        return len(self.waiting) + self._inbox.qsize()

    def _dequeued(self) -> None:
        with self._lock:
            self._waiting_count -= 1


def end_reason(request: Request, now: float) -> str | None:
    """Why a request ends now ("abort": cancelled, "timeout": past its deadline), or None."""
    if request.cancelled.is_set():
        return "abort"
    if request.deadline is not None and now > request.deadline:
        return "timeout"
    return None


__all__ = ["QueueFull", "Scheduler"]
