"""Continuous batching: many callers share one model, decoded together by one thread.

A server gets requests at any moment, and each wants its tokens as soon as they are made. Running
them one after another leaves the model idle most of the time: one row of a decoding step costs
almost what eight rows cost, because every step reads all the weights once whatever the batch.
So all the requests in flight decode together on one `Engine` (minigpt/engine.py), and the batch
changes between steps:

    the batcher's thread, over and over:
        1. take in new jobs, up to `max_batch_size` rows (the rest wait, first come first served),
           and drop the jobs their callers cancelled (a client that hung up)
        2. engine.step(): one token for every row (new rows are prefilled first)
        3. hand each job its new text (`RowText`: never half a UTF-8 character, nothing from a
           stop string on); a finished row leaves the batch, and a waiting job takes its place

The batcher knows nothing of HTTP: a `Job` carries a `deliver` callback that the thread calls
with each `Piece` (the server's callback moves it into its event loop). `submit` refuses a job
when the batch is full and `max_queue` jobs already wait (`QueueFull`: the server answers 429), and after
`begin_shutdown` (`ShuttingDown`: 503). At the shutdown's deadline the jobs still running are
ended, each with its last piece and finish reason "length".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from minigpt.engine import Engine, FinishReason, Request, SamplingConfig
from minigpt.errors import UserInputError
from minigpt.generation import RowText
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """`max_queue` jobs already wait for a row."""


class ShuttingDown(Exception):
    """The batcher takes no new jobs: it is finishing the running ones before the process exits."""


@dataclass(frozen=True)
class Piece:
    """Some text of a job, as it is made. The job's last piece has `finish` set ("stop" or
    "length"), or `error` if decoding failed (then the job's text is incomplete)."""

    text: str
    finish: FinishReason | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request's generation: what to decode, and where its pieces go (`deliver`, called from
    the batcher's thread). The batcher fills in the tokens as they come."""

    prompt_ids: Sequence[int]
    sampling: SamplingConfig
    deliver: Callable[[Piece], None]
    stop_strings: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)  # the tokens generated so far (a stop token is not one)
    finished: bool = False
    row: int | None = field(default=None, repr=False)  # the engine's row id while it decodes
    text: RowText | None = field(default=None, repr=False)


class Batcher:
    """Decodes every submitted job on one engine in a thread of its own: `submit`, `cancel`,
    `begin_shutdown`, `close`. Safe to call from any thread."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int = 8, max_queue: int = 64,
                 use_kv_cache: bool = True):
        self.engine = Engine(model, use_kv_cache)
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # engine row id -> job
        self._cancelled: list[Job] = []
        self._deadline: float | None = None  # set by begin_shutdown: running jobs end then
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="minigpt-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- what callers use

    def submit(self, job: Job) -> None:
        """Queue a job; its pieces come through `job.deliver`. Raises QueueFull (a full batch and
        `max_queue` jobs waiting) or ShuttingDown."""
        with self._condition:
            if self._deadline is not None or self._closed:
                raise ShuttingDown()
            # Room for a full batch plus max_queue waiting: a job that arrived during a step and
            # will take a free row at the next one does not count as waiting.
            if len(self._waiting) + len(self._running) >= self.max_batch_size + self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        """Nobody waits for this job any more: drop it before the next step (no more pieces come)."""
        with self._condition:
            if not job.finished:
                self._cancelled.append(job)
                self._condition.notify()

    @property
    def counts(self) -> dict[str, int]:
        """How many jobs decode ("running") and how many wait for a row ("waiting")."""
        with self._condition:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    @property
    def shutting_down(self) -> bool:
        return self._deadline is not None

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Take no new jobs; let the running and waiting ones go on for `grace_seconds`, then end them."""
        with self._condition:
            if self._deadline is None:
                self._deadline = time.monotonic() + grace_seconds
                self._condition.notify()

    def close(self, timeout: float | None = None) -> None:
        """End every job now (finish "length") and stop the thread."""
        with self._condition:
            self._deadline = time.monotonic()
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not (self._waiting or self._running or self._cancelled or self._closed):
                    self._condition.wait()
                self._drop_cancelled()
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._end_all()
                if self._closed and not self.engine.has_work:
                    return
                self._admit()
            if self.engine.has_work:
                self._step()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            job = self._waiting.popleft()
            job.text = RowText(self.tokenizer, job.stop_strings)
            try:
                job.row = self.engine.add(Request(job.prompt_ids, job.sampling))
            except UserInputError as error:  # a prompt the window cannot hold, say: this job ends, the others go on
                self._finish(job, Piece("", None, str(error)))
                continue
            self._running[job.row] = job

    def _drop_cancelled(self) -> None:
        for job in self._cancelled:
            job.finished = True
            if job.row is None:
                if job in self._waiting:
                    self._waiting.remove(job)
            elif self._running.pop(job.row, None) is not None:
                self.engine.cancel(job.row)
        self._cancelled.clear()

    def _end_all(self) -> None:
        """The shutdown's grace is over: every job ends now with what it has, as if cut by length."""
        for job in list(self._waiting):
            self._finish(job, Piece("", "length"))
        self._waiting.clear()
        for row, job in list(self._running.items()):
            self.engine.cancel(row)
            self._finish(job, Piece(job.text.cut(), "length"))
        self._running.clear()

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as error:  # noqa: BLE001 - out of memory, say: the jobs end with the reason, the server lives on
            log.exception("decoding failed")
            with self._condition:
                for job in self._running.values():
                    self._finish(job, Piece("", None, f"decoding failed: {type(error).__name__}: {error}"))
                self._running.clear()
                self.engine = Engine(self.engine.model, self.engine.use_kv_cache)
            return
        with self._condition:
            for event in events:
                job = self._running.get(event.row)
                if job is None:  # cancelled while the step ran
                    continue
                if event.token is not None:
                    job.token_ids.append(event.token)
                text, finish = job.text.take(event, self.engine)
                if finish is not None:
                    del self._running[event.row]
                    self._finish(job, Piece(text, finish))
                elif text:
                    self._deliver(job, Piece(text))

    def _finish(self, job: Job, piece: Piece) -> None:
        job.finished = True
        self._deliver(job, piece)

    def _deliver(self, job: Job, piece: Piece) -> None:
        """Hand a piece over; a caller whose callback fails (its event loop closed) loses its job, not the thread."""
        try:
            job.deliver(piece)
        except Exception:  # noqa: BLE001 - the thread serves every other job
            log.exception("a job's deliver callback failed; the job is dropped")
            if not job.finished and job.row is not None and self._running.pop(job.row, None) is not None:
                self.engine.cancel(job.row)
            job.finished = True
