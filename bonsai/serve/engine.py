"""The render engine: one worker thread owns the pipeline (loads it, then runs dynamic batches of queued jobs).

Jobs with the same (width, height, steps, style) that arrive within `max_delay_s` of the oldest one run as one
`pipe(...)` call of up to `max_batch` images; `Pipeline` keeps each image's pixels those of its prompt and seed
alone, so batching changes throughput, not images. A failed batched call is re-run one job at a time so that only
the bad job fails. Nothing here knows HTTP: the app maps the exceptions below to status codes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable

from ..errors import BonsaiError, Cancelled
from ..prompt import tokenize

log = logging.getLogger(__name__)

BATCH_TIME_EMA = 0.3  # weight of the newest batch in the running mean used for Retry-After


class QueueFull(BonsaiError):
    """The queue holds `max_queue` jobs; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(BonsaiError):
    """No render possible now: `code` is "loading", "failed" (the model did not load) or "shutting_down"."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Spec:
    """One request's render: `len(seeds)` images of `prompt` (style applied by the pipeline)."""

    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    style: str | None = None

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one batched call."""
        return self.width, self.height, self.steps, self.style


@dataclass(frozen=True)
class Rendered:
    """A job's images (PIL, metadata in `.info`) and the report of the batched call that rendered them."""

    images: list
    report: object  # bonsai.pipeline.Report of the whole call
    queued_s: float
    batch_images: int
    batch_requests: int


class Job:
    """A submitted spec. `future` gets a `Rendered` or an exception; `progress(done, total)` is called from the
    worker thread after each denoise step of the job's batch."""

    def __init__(self, spec: Spec, progress: Callable[[int, int], None] | None = None):
        self.spec = spec
        self.progress = progress
        self.future: Future = Future()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()

    @property
    def images(self) -> int:
        return len(self.spec.seeds)


class Engine:
    """Loads the pipeline with `load()` in its worker thread, then renders submitted jobs in dynamic batches.

    Args:
        load: returns a `bonsai.Pipeline` (called once, in the worker thread).
        metrics: a `bonsai.serve.metrics.Metrics`, updated per batch and step.
        max_batch: most images per batched call (a single job of more images runs alone, in chunks).
        max_delay_s: how long the oldest queued job waits for compatible ones.
        max_queue: most jobs waiting (running ones not counted); more -> `QueueFull`.
        on_failed: called with the error message when `load()` fails.
    """

    def __init__(self, load: Callable[[], object], metrics, max_batch: int = 8, max_delay_s: float = 0.01,
                 max_queue: int = 64, on_failed: Callable[[str], None] | None = None):
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._load = load
        self._on_failed = on_failed
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._batch_cancel = threading.Event()
        self._state = "loading"  # -> "ready" | "failed"
        self._error: str | None = None
        self._closing = False  # no new jobs; queued ones still run until close()'s deadline
        self._abort = False  # close()'s deadline passed: running jobs fail with Unavailable
        self._stopped = False
        self._pipe = None
        self._batch_s: float | None = None
        self._thread = threading.Thread(target=self._main, name="bonsai-engine", daemon=True)

    # --- state, for the app ---

    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> str:
        """"loading", "ready", "failed" or "shutting_down"."""
        with self._cond:
            return "shutting_down" if self._closing and self._state == "ready" else self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def pipe(self):
        """The loaded pipeline (None until ready)."""
        return self._pipe

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def running_images(self) -> int:
        with self._cond:
            return sum(j.images for j in self._running if not j.cancelled.is_set())

    def check_prompt(self, full_prompt: str) -> None:
        """Raises BonsaiValueError if the prompt (style applied) is longer than the text encoder reads."""
        pipe = self._require_ready()
        tokenize(pipe.tokenizer, [full_prompt], pipe.text_config.max_length)  # bonsai's tokenizer is thread-safe

    # --- jobs ---

    def submit(self, spec: Spec, progress: Callable[[int, int], None] | None = None) -> Job:
        """Queue a render; raises `Unavailable` (loading, failed, shutting down) or `QueueFull`."""
        job = Job(spec, progress)
        with self._cond:
            self._require_ready()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)", self._retry_after())
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or from its running batch (the batch stops when all its
        jobs are cancelled). The job's future gets `Cancelled`."""
        with self._cond:
            if job.future.done():
                return
            job.cancelled.set()
            if job in self._queue:
                self._queue.remove(job)
            elif job in self._running and all(j.cancelled.is_set() for j in self._running):
                self._batch_cancel.set()
            self.metrics.cancelled.inc()
            self._cond.notify_all()
        _settle(job, error=Cancelled("the client disconnected"))

    def close(self, timeout_s: float) -> None:
        """Stop taking jobs; let queued and running ones finish for up to `timeout_s`, then fail the rest with
        `Unavailable("shutting_down")` and stop the worker. Safe to call more than once."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue and not self._running or self._state != "ready",
                                timeout=max(0.0, deadline - time.monotonic()))
            left = list(self._queue)
            self._queue.clear()
            self._abort = self._stopped = True
            self._batch_cancel.set()
            self._cond.notify_all()
        for job in left:
            _settle(job, error=Unavailable("the server is shutting down", "shutting_down"))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    def _require_ready(self):
        if self._closing:
            raise Unavailable("the server is shutting down", "shutting_down")
        if self._state == "loading":
            raise Unavailable("the model is still loading", "loading")
        if self._state == "failed":
            raise Unavailable(f"the model failed to load: {self._error}", "failed")
        return self._pipe

    def _retry_after(self) -> int:
        batch_s = self._batch_s if self._batch_s is not None else 1.0
        return max(1, math.ceil(batch_s * (len(self._queue) / self.max_batch + 1)))

    # --- the worker thread ---

    def _main(self) -> None:
        try:
            pipe = self._load()
        except Exception as e:  # noqa: BLE001 - any load failure is reported on /healthz and by the CLI
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            log.error("model load failed: %s", message)
            with self._cond:
                self._state, self._error = "failed", message
                self._cond.notify_all()
            self.metrics.ready.set(0)
            if self._on_failed is not None:
                self._on_failed(message)
            return
        with self._cond:
            self._pipe, self._state = pipe, "ready"
            self._cond.notify_all()
        self.metrics.ready.set(1)
        log.info("model ready: %s (%s, %s)", pipe.model, pipe.variant, pipe.backend)
        while (batch := self._next_batch()) is not None:
            try:
                self._render(batch, retry=True)
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        """Block until the oldest job's window closes (or its batch is full); take its compatible jobs."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                batch = self._compatible(head)
                wait = head.enqueued + self.max_delay_s - time.monotonic()
                if sum(j.images for j in batch) >= self.max_batch or wait <= 0 or self._closing:
                    for job in batch:
                        self._queue.remove(job)
                    self._running = batch
                    self._batch_cancel = threading.Event()
                    return batch
                self._cond.wait(wait)

    def _compatible(self, head: Job) -> list[Job]:
        batch, images = [], 0
        for job in self._queue:
            if job.spec.key == head.spec.key and (not batch or images + job.images <= self.max_batch):
                batch.append(job)
                images += job.images
        return batch

    def _render(self, jobs: list[Job], retry: bool) -> None:
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        spec = jobs[0].spec
        prompts = [j.spec.prompt for j in jobs for _ in j.spec.seeds]
        seeds = [s for j in jobs for s in j.spec.seeds]
        batch_size = min(len(prompts), self.max_batch)
        chunks = [min(batch_size, len(prompts) - i) for i in range(0, len(prompts), batch_size)]
        total_steps, done = spec.steps * len(chunks), 0
        cancel = self._batch_cancel

        def on_step(_step, _latents):
            nonlocal done
            done += 1
            self.metrics.steps.inc()
            for j in jobs:
                if j.progress is not None and not j.cancelled.is_set():
                    j.progress(done, total_steps)

        started = time.monotonic()
        try:
            result = self._pipe(prompts, width=spec.width, height=spec.height, steps=spec.steps, seed=seeds,
                                style=spec.style, batch_size=batch_size, callback=on_step, cancel=cancel,
                                progress=False)
        except Cancelled:
            error = Unavailable("the server shut down during the render", "shutting_down") if self._abort else \
                Cancelled("every request of the batch was cancelled")
            for j in jobs:
                _settle(j, error=error)
            return
        except Exception as e:  # noqa: BLE001 - a failing request fails alone; the worker keeps serving
            if retry and len(jobs) > 1:
                log.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(jobs),
                            type(e).__name__, e)
                for j in jobs:
                    self._render([j], retry=False)
                return
            log.warning("render failed: %s: %s", type(e).__name__, e)
            for j in jobs:
                _settle(j, error=e)
            return
        seconds = time.monotonic() - started
        self._batch_s = seconds if self._batch_s is None else (
            BATCH_TIME_EMA * seconds + (1 - BATCH_TIME_EMA) * self._batch_s)
        self.metrics.observe_batch(chunks, len(jobs))
        i = 0
        for j in jobs:
            _settle(j, Rendered(result.images[i:i + j.images], result.report, started - j.enqueued, len(prompts),
                                len(jobs)))
            i += j.images


def warm_up(pipe, sizes: list[tuple[int, int]], max_batch: int) -> None:
    """Render 1-step batches of 1 to `max_batch` images at each (width, height), so that per-shape work (kernel
    compilation, GEMM choices, one CUDA graph per batch size) happens before the server reports ready."""
    for width, height in sizes:
        for b in range(1, max_batch + 1):
            pipe(["warm-up"] * b, width=width, height=height, steps=1, seed=list(range(b)), batch_size=b,
                 progress=False)


def _settle(job: Job, result: Rendered | None = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except InvalidStateError:  # already settled (cancelled by its client)
        pass
