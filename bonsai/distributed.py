"""A JSONL batch across a Ray cluster: one actor per GPU (or CPU workers), each loading the Pipeline once.

Everything but where chunks run is `bonsai.jobs`: the same checks, skips, chunks, file names, atomic writes and
results.jsonl as the single-process `bonsai batch`. Here chunks go to idle worker actors; a worker that dies (killed,
OOM, lost node) is restarted by Ray, and its unfinished chunk goes back to the queue for the next idle worker, at
most `max_retries` times. Workers write the PNGs themselves, so on several nodes the output folder must be a shared
folder mounted at the same path everywhere (docs/scale-out.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections import Counter, deque
from pathlib import Path

from . import jobs, params
from .errors import BonsaiError, BonsaiValueError

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # resubmissions of a chunk whose worker died, and restarts of each worker
PROBES, PROBE_DELAY_S = 20, 0.5  # calls to a worker that fail before Ray restarts it, and the pause after each
START_TIMEOUT_S = 900.0  # no worker loaded its model by then: give up (a cluster without the resources asked)

# Test hook (tests/test_distributed.py): a path; the first worker to start its second chunk creates the file and
# exits at once (os._exit), as a killed process would. Set it only through render_jobs(runtime_env=...).
EXIT_ONCE_ENV = "BONSAI_TEST_WORKER_EXIT_ONCE"


class Worker:
    """The body of a Ray worker actor: loads the pipeline once, renders chunks (`bonsai.jobs.render`)."""

    def __init__(self, index: int, model: str, backend: str, options: dict):
        self.name = jobs.worker_name(f"ray-{index}")
        self.chunks = 0
        t0 = time.perf_counter()
        try:
            self.pipe, self.error = _load(model, backend, **options), None
        except Exception as e:  # noqa: BLE001 - reported by the driver in one line, not as a Ray traceback
            self.pipe, self.error = None, jobs.one_line(e)
        self.load_s = time.perf_counter() - t0

    def info(self, marker: str) -> dict:
        error = self.error
        if error is None and not os.path.exists(marker):
            error = (f"the output folder {os.path.dirname(marker)} is not visible on {socket.gethostname()}: "
                     f"on several nodes it must be a shared folder mounted at the same path")
        return dict(worker=self.name, load_s=self.load_s, error=error)

    def render(self, chunk, overwrite: bool, since_ns: int, attempt: int) -> list[dict]:
        if self.pipe is None:  # a restart whose model load failed
            raise BonsaiError(self.error)
        self.chunks += 1
        exit_file = os.environ.get(EXIT_ONCE_ENV)
        if exit_file and self.chunks == 2 and _create(exit_file):
            os._exit(1)
        return jobs.render(self.pipe, chunk, overwrite=overwrite, since_ns=since_ns, worker=self.name,
                           attempt=attempt)


def _create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _load(model: str, backend: str, loras=(), **options):
    from .backends import resolve
    from .pipeline import Pipeline

    chosen = resolve(backend)  # on the worker's node: the driver may have no GPU
    pipe = Pipeline.from_pretrained(model, backend=chosen.value, **options)
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    return pipe


def render_jobs(jobs_or_path, model: str, out: str | Path, address: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None, batch_size: int = 1, overwrite: bool = False,
                backend: str = "auto", max_retries: int = MAX_RETRIES, progress: bool = True,
                timeout_s: float | None = None, runtime_env: dict | None = None, on_row=None,
                **pipeline_options) -> list[dict]:
    """Render a batch on Ray workers; the same files, pixels and results.jsonl as the single-process batch.

    Args:
        jobs_or_path: a JSONL file, or an iterable of job dicts (one per line) or `bonsai.jobs.Job`s.
        model: repo id or folder, loaded on every worker (cached per node; see docs/scale-out.md).
        out: output folder (shared by every node).
        address: None or "auto" (this process's Ray connection, else a running cluster, else a new local Ray
            runtime), or a cluster address ("ray://host:10001", "host:6379").
        workers: worker actors (default: one per gpus_per_worker GPUs of the cluster; one on a cluster without GPUs).
        gpus_per_worker: GPUs per worker (default 1 on a cluster with GPUs, 0 otherwise: CPU workers that share
            the cluster's CPUs).
        batch_size: same-size jobs rendered together through one forward.
        overwrite: render jobs whose output exists (default: skip them).
        max_retries: resubmissions of a chunk whose worker died, and Ray restarts of each worker.
        timeout_s: give up after this long; unfinished jobs get failure rows.
        runtime_env: Ray runtime_env of the workers (env_vars such as HF_HOME; no local paths).
        on_row: called with each results row as it comes.
        pipeline_options: passed to `Pipeline.from_pretrained` (device, dtype, local_files_only, ...), and
            `loras=[(path, scale), ...]`, loaded on every worker.
    Returns:
        the results rows in line order (as written to out/results.jsonl).
    """
    if importlib.util.find_spec("ray") is None:
        raise ImportError("bonsai.distributed needs Ray: pip install -e '.[ray]'")
    workers = None if workers is None else params.integer(workers, "workers", 1, 4096)
    if gpus_per_worker is not None:
        gpus_per_worker = params.finite(gpus_per_worker, "gpus_per_worker", 0.0, 64.0)
    max_retries = params.integer(max_retries, "max_retries", 0, 100)
    if timeout_s is not None:
        timeout_s = params.finite(timeout_s, "timeout_s", 0.0, 1e9)
    execute = _on_ray(address, workers, gpus_per_worker, model, backend, pipeline_options, max_retries, timeout_s,
                      runtime_env or {})
    return jobs.run(jobs_or_path, out, execute, batch_size=batch_size, overwrite=overwrite, progress=progress,
                    on_row=on_row)


def _on_ray(address, workers, gpus_per_worker, model, backend, options, max_retries, timeout_s, runtime_env):
    def execute(chunks, overwrite, since_ns, marker):
        import ray

        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        started = _connect(address)
        actors = []
        try:
            actors = _start(workers, gpus_per_worker, model, backend, options, max_retries, runtime_env)
            yield from _dispatch(actors, chunks, overwrite, since_ns, str(marker), max_retries, t0, deadline)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()

    return execute


def _connect(address: str | None) -> bool:
    """Connect to Ray unless this process already is; True when we did (so we disconnect at the end)."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "auto"):
        try:
            ray.init(address="auto")
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local Ray runtime")
            ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def _start(workers, gpus_per_worker, model, backend, options, max_retries, runtime_env) -> list:
    """Worker actors sized to the cluster (their model load starts now, in parallel)."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker > 0:
        workers = workers or max(1, int(gpus // gpus_per_worker))
        if workers * gpus_per_worker > gpus:
            raise BonsaiValueError(f"workers: {workers} x {gpus_per_worker:g} GPU need {workers * gpus_per_worker:g} "
                                   f"GPUs; the Ray cluster has {gpus:g} (pass --gpus-per-worker 0 for CPU workers)")
        resources = dict(num_gpus=gpus_per_worker, num_cpus=1)
    else:
        workers = workers or 1
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        if workers > cpus:
            raise BonsaiValueError(f"workers: {workers} CPU workers need {workers} CPUs; the Ray cluster has {cpus:g}")
        resources = dict(num_gpus=0, num_cpus=max(1, min(node_cpus, cpus // workers)))
    log.info("starting %d Ray workers with %s each", workers, resources)
    remote = ray.remote(Worker).options(max_restarts=max_retries, max_task_retries=0, runtime_env=runtime_env or None,
                                        **resources)
    return [remote.remote(i, model, backend, options) for i in range(workers)]


def _dispatch(actors, chunks, overwrite, since_ns, marker, max_retries, t0, deadline):
    """One chunk in flight per ready worker; yields the rows of each finished chunk; every job ends with a row."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    queue = deque((chunk, 1) for chunk in chunks)
    pending = {}  # ref -> (actor, chunk, attempt); chunk None: a probe (`info`), the actor takes work once it answers
    idle, later, failed_probes, errors, ready = deque(), [], Counter(), [], 0

    def probe(actor):
        pending[actor.info.remote(marker)] = (actor, None, 0)

    def rendering():
        return [(c, a) for _, c, a in pending.values() if c is not None]

    for actor in actors:
        probe(actor)
    while queue or rendering():
        now = time.monotonic()
        for item in [x for x in later if x[0] <= now]:
            later.remove(item)
            probe(item[1])
        while queue and idle:
            actor, (chunk, attempt) = idle.popleft(), queue.popleft()
            pending[actor.render.remote(chunk, overwrite, since_ns, attempt)] = (actor, chunk, attempt)
        if not pending and not later:
            yield from _fail(queue, f"no Ray worker left ({'; '.join(dict.fromkeys(errors)) or 'all died'})")
            return
        if not ready and now - t0 > START_TIMEOUT_S:
            raise BonsaiError(f"no Ray worker loaded the model within {START_TIMEOUT_S:.0f} s (does the cluster have "
                              f"the resources asked for? it has {ray.cluster_resources()})")
        if deadline is not None and now > deadline:
            yield from _fail(rendering() + list(queue), f"timed out after {deadline - t0:.0f} s (timeout_s)")
            return
        if not pending:
            time.sleep(PROBE_DELAY_S)
            continue
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROBE_DELAY_S if later else 1.0)
        if not done:
            continue
        actor, chunk, attempt = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except RayTaskError as e:  # a bug, not a lost worker: a retry would fail the same way
            yield from _fail([(chunk, attempt)] if chunk else [], jobs.one_line(e.cause or e))
            idle.append(actor)
            continue
        except RayError as e:  # the worker process or its node died, or the actor is not reachable yet
            if chunk is None:
                # Right after a death a call can fail before Ray marks the actor restarting; once it is, calls
                # wait for the restart. An actor past its restarts fails every probe: dropped after a few.
                failed_probes[actor] += 1
                if failed_probes[actor] < PROBES:
                    later.append((now + PROBE_DELAY_S, actor))
                continue
            errors.append(f"a worker died ({type(e).__name__})")
            if attempt > max_retries:
                yield from _fail([(chunk, attempt)], f"its worker died {attempt} times")
            else:
                log.warning("a worker died; lines %s go back to the queue", [j.line for j in chunk])
                queue.appendleft((chunk, attempt + 1))
            probe(actor)  # Ray restarts it (at most max_retries times)
            continue
        if chunk is not None:
            yield from result
        elif result["error"]:
            errors.append(result["error"])
            log.warning("worker %s cannot render: %s", result["worker"], result["error"])
            ray.kill(actor, no_restart=True)
            continue
        else:
            ready += 1
            failed_probes[actor] = 0
            log.info("worker %s ready (model load %.1f s)", result["worker"], result["load_s"])
        idle.append(actor)


def _fail(chunks, reason: str):
    for chunk, attempt in chunks:
        for job in chunk:
            yield jobs.row(job.line, "failed", job, error=reason, attempt=attempt)
