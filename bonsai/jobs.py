"""Batch jobs: a JSONL file -> checked jobs -> batches of one size -> PNGs and `results.jsonl`.

Shared by the single-process `bonsai batch` and the Ray path (`bonsai.distributed`): both read, skip, batch, render
and record through the functions here; they differ only in where `render` runs.

A line is a JSON object with `prompt` and optional `size` ("WxH") or `width`/`height` or `aspect`/`long_edge`,
`steps`, `seed`, `style`, `out`; a null value means "not given". Every generation field is checked by
`bonsai.params.check`. A job without a seed uses its line number as seed, so a re-run, or another worker, renders
the same pixels. Imports neither torch nor ray.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Iterator, Sequence

from . import params, sizes
from .errors import BonsaiFileNotFoundError, BonsaiValueError

KEYS = ("prompt", "size", "width", "height", "aspect", "long_edge", "steps", "seed", "style", "out")
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Job:
    """One checked line: render `prompt` at width x height with `seed` into `path` (`out` relative to the folder)."""

    line: int
    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    style: str | None
    out: str
    path: Path

    @property
    def group(self) -> tuple:
        """Jobs with the same group render together through one forward."""
        return (self.width, self.height, self.steps, self.style)


def default_seed(line: int) -> int:
    """The seed of a job that gives none: its line number (1-based)."""
    return line


def default_name(line: int) -> str:
    return f"job-{line:04d}.png"


def output_name(value, line: int) -> str:
    """The checked `out` of a line, relative to the output folder, ending in .png."""
    if value is None:
        return default_name(line)
    if not isinstance(value, str) or not value.strip():
        raise BonsaiValueError(f"out must be a non-empty relative path, got {value!r}")
    if "\0" in value or not value.isprintable() or not _utf8(value):
        raise BonsaiValueError(f"out must be printable UTF-8 text, got {value!r}")
    win = PureWindowsPath(value)
    if value.startswith(("/", "\\", "~")) or win.drive or PurePosixPath(value).is_absolute():
        raise BonsaiValueError(f"out must be a path relative to the output folder, got {value!r}")
    if ".." in PurePosixPath(value).parts or ".." in win.parts:
        raise BonsaiValueError(f"out must stay inside the output folder ('..' not allowed), got {value!r}")
    rel = PurePosixPath(value)
    if any(len(part.encode("utf-8")) > 250 for part in rel.parts):  # 255 on most file systems, less our suffixes
        raise BonsaiValueError(f"out has a name longer than 250 bytes: {value[:40]!r}...")
    if rel.name in ("", "."):
        raise BonsaiValueError(f"out must name a file, got {value!r}")
    if rel.suffix.lower() != ".png":
        if rel.suffix:
            raise BonsaiValueError(f"out must end in .png (or have no suffix), got {value!r}")
        rel = rel.with_name(rel.name + ".png")
    return rel.as_posix()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False
    return True


def output_path(folder: Path, name: str) -> Path:
    """folder / name, refused when it resolves outside the folder (a symlink inside it, say)."""
    root = folder.resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise BonsaiValueError(f"out {name!r} resolves to {path}, outside the output folder {root}")
    return path


def parse(obj, line: int, folder: Path) -> Job:
    """One decoded line -> Job, or BonsaiValueError naming the key."""
    if not isinstance(obj, dict):
        raise BonsaiValueError(f"each line must be a JSON object, got a JSON {_json_type(obj)}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise BonsaiValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    given = {k: v for k, v in obj.items() if v is not None}
    if "prompt" not in given:
        raise BonsaiValueError("prompt is missing")
    if not isinstance(given["prompt"], str):
        raise BonsaiValueError(f"prompt must be a string, got a JSON {_json_type(given['prompt'])}")
    if isinstance(given.get("seed"), (list, tuple)):
        raise BonsaiValueError(f"seed must be an integer, got {given['seed']!r}")
    width, height = given.get("width"), given.get("height")
    if "size" in given:
        both = [k for k in ("width", "height", "aspect", "long_edge") if k in given]
        if both:
            raise BonsaiValueError(f"size and {'/'.join(both)} both given; pass one of them")
        width, height = sizes.parse_size(given["size"])
    req = params.check(given["prompt"], width, height, given.get("steps", 4), given.get("seed", default_seed(line)),
                       given.get("style"), given.get("aspect"), given.get("long_edge"))
    name = output_name(given.get("out"), line)
    return Job(line=line, prompt=req.prompts[0], width=req.width, height=req.height, steps=req.steps,
               seed=req.seeds[0], style=req.style, out=name, path=output_path(folder, name))


def read(source: str | Path | Iterable, folder: str | Path) -> tuple[list[Job], list[dict]]:
    """Jobs from a JSONL file (or an iterable of dicts / Jobs), and a failure row per bad line; the rest go on.

    Raises BonsaiFileNotFoundError when the file is missing; never on a bad line."""
    folder = Path(folder)
    if isinstance(source, (str, Path)):
        items = _lines(Path(source))
    else:
        items = ((i, item) for i, item in enumerate(source, 1))
    jobs, failed, owner = [], [], {}
    for line, item in items:
        try:
            if isinstance(item, BonsaiValueError):
                raise item
            job = item if isinstance(item, Job) else parse(item, line, folder)
            if job.path in owner:
                raise BonsaiValueError(f"out {job.out!r} is also the output of line {owner[job.path]}")
        except BonsaiValueError as e:
            failed.append(row(line, "failed", error=str(e)))
            continue
        owner[job.path] = job.line
        jobs.append(job)
    return jobs, failed


def _lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON or the BonsaiValueError saying why not) for each non-blank line."""
    if not path.is_file():
        raise BonsaiFileNotFoundError(f"jobs file {path} not found (a JSONL file: one JSON object per line)")
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line, BonsaiValueError("line is not UTF-8 text")
                continue
            text = text.lstrip("\ufeff") if line == 1 else text
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as e:
                yield line, BonsaiValueError(f"not valid JSON: {e.msg} at column {e.colno}")


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- progress of a run ---------------------------------------------------------------------------------------------


def mark(folder: Path) -> Path:
    """A new file in the output folder that marks this run while it lasts: its mtime is the run's start on the
    folder's clock (a file with a later mtime was written by this run: a retry after a worker died keeps it, even
    with overwrite), and a worker on another node that cannot see it is not writing into this folder.
    Strictly later: file times tick coarsely (~4 ms), and an earlier run's last file may share the start's tick."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BonsaiValueError(f"out {folder} is a file; pass a folder for the images") from None
    marker = folder / f".bonsai-run-{uuid.uuid4().hex}"
    marker.touch(exist_ok=False)
    return marker


def existing(job: Job, since_ns: int) -> str | None:
    """None (no output yet), "before" (an earlier run wrote it) or "now" (this run wrote it)."""
    try:
        mtime = job.path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return "now" if mtime > since_ns else "before"


def plan(jobs: Sequence[Job], batch_size: int) -> list[tuple[Job, ...]]:
    """Chunks of up to batch_size jobs of one group, groups in order of first appearance: the same chunks (so the
    same pixels) whichever process renders them."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [tuple(g[i : i + batch_size]) for g in groups.values() for i in range(0, len(g), batch_size)]


def row(line: int, status: str, job: Job | None = None, error: str | None = None, worker: str | None = None,
        attempt: int | None = None, batch: int | None = None, timings: dict | None = None,
        peak_memory_gb: float | None = None) -> dict:
    """One `results.jsonl` row. status: "done" (rendered by this run), "skipped" (the output was already there) or
    "failed" (error says why)."""
    return dict(line=line, status=status, out=job and job.out, seed=job and job.seed,
                size=job and f"{job.width}x{job.height}", steps=job and job.steps, style=job and job.style,
                worker=worker, attempt=attempt, batch=batch, timings=timings, peak_memory_gb=peak_memory_gb,
                finished_at=time.time(), error=error)


def worker_name(prefix: str = "local") -> str:
    return f"{prefix}@{socket.gethostname()}:{os.getpid()}"


# --- rendering -----------------------------------------------------------------------------------------------------


def render(pipe, chunk: Sequence[Job], *, overwrite: bool = False, since_ns: int = 0, worker: str | None = None,
           attempt: int = 1) -> list[dict]:
    """Render one chunk (jobs of one group) through `pipe` into its files, atomically; one row per job.

    Skips a job whose output exists (unless overwrite) and one whose output this run already wrote. A failing
    batch is re-rendered one job at a time, so that one bad job (a prompt over the token limit) fails alone."""
    worker = worker or worker_name()
    rows, todo = [], []
    for job in chunk:
        state = existing(job, since_ns)
        if state == "now":  # written by a worker that died before reporting it
            rows.append(row(job.line, "done", job, worker=worker, attempt=attempt))
        elif state == "before" and not overwrite:
            rows.append(row(job.line, "skipped", job, worker=worker, attempt=attempt))
        else:
            todo.append(job)
    if not todo:
        return rows
    first = todo[0]
    t0 = time.perf_counter()
    try:
        result = pipe([j.prompt for j in todo], width=first.width, height=first.height, steps=first.steps,
                      seed=[j.seed for j in todo], style=first.style, batch_size=len(todo), progress=False)
    except Exception as e:  # noqa: BLE001 - one bad job must not stop the batch; it is reported in its row
        if len(todo) > 1:
            return rows + [r for j in todo for r in render(pipe, (j,), overwrite=overwrite, since_ns=since_ns,
                                                           worker=worker, attempt=attempt)]
        return rows + [row(first.line, "failed", first, error=one_line(e), worker=worker, attempt=attempt)]
    rep = result.report
    render_s = time.perf_counter() - t0
    for job, image in zip(todo, result.images):
        t1 = time.perf_counter()
        try:
            write_png(image, job.path)
        except OSError as e:  # this file only (a read-only subfolder, say); a full disk fails every job in turn
            rows.append(row(job.line, "failed", job, error=f"cannot write {job.out}: {one_line(e)}", worker=worker,
                            attempt=attempt))
            continue
        timings = dict(render_s=render_s, encode_s=rep.encode_s, denoise_s=rep.denoise_s, decode_s=rep.decode_s,
                       write_s=time.perf_counter() - t1)
        rows.append(row(job.line, "done", job, worker=worker, attempt=attempt, batch=len(todo), timings=timings,
                        peak_memory_gb=rep.peak_memory_gb))
    return rows


def write_png(image, path: Path) -> None:
    """Save with the generation metadata under a temporary name in the same folder, then rename: a reader (or a
    re-run) never sees a partial file."""
    from .pipeline import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        save_png(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_results(folder: Path, rows: Iterable[dict]) -> Path:
    """DIR/results.jsonl, one row per input line in line order, replaced atomically."""
    target = folder / RESULTS
    tmp = _temp_name(target)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for r in sorted(rows, key=lambda r: r["line"]):
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _temp_name(path: Path) -> Path:
    # Same folder (os.replace is atomic only within one file system), a name no other writer picks, and the
    # default permissions of a new file (tempfile.mkstemp would make it private).
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- a whole run ---------------------------------------------------------------------------------------------------

# execute(chunks, overwrite, since_ns, marker) yields one row per job of the chunks, in any order (see `mark`).
Execute = Callable[[list, bool, int, Path], Iterable[dict]]


def in_process(load: Callable[[], object]) -> Execute:
    """Render every chunk in this process with the pipeline `load()` gives (called once, only if there is work)."""

    def execute(chunks, overwrite, since_ns, marker):
        pipe, worker = load(), worker_name()
        for chunk in chunks:
            yield from render(pipe, chunk, overwrite=overwrite, since_ns=since_ns, worker=worker)

    return execute


def run(source, folder: str | Path, execute: Execute, *, batch_size: int = 1, overwrite: bool = False,
        progress: bool = True, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Read and check every line (bad ones become failure rows at once), skip jobs whose output exists (unless
    overwrite), render the rest in chunks of up to batch_size same-size jobs through `execute`, write
    DIR/results.jsonl. Returns the rows, in line order. `on_row` sees each row as it comes."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    batch_size = params.integer(batch_size, "batch_size", 1, params.MAX_BATCH)
    jobs, rows = read(source, folder)
    marker = mark(folder)
    try:
        since_ns = marker.stat().st_mtime_ns
        todo = []
        for job in jobs:
            if existing(job, since_ns) and not overwrite:
                rows.append(row(job.line, "skipped", job))
            else:
                todo.append(job)
        for r in rows:
            if on_row is not None:
                on_row(r)
        try:
            with tqdm(total=len(todo), unit="img", desc="batch", disable=not progress or not todo) as bar:
                for r in execute(plan(todo, batch_size), overwrite, since_ns, marker) if todo else ():
                    rows.append(r)
                    bar.update(1)
                    if on_row is not None:
                        on_row(r)
        except BaseException as e:  # the model did not load, Ctrl-C, ...: results.jsonl still has every line
            seen = {r["line"] for r in rows}
            rows += [row(j.line, "failed", j, error=f"not rendered: {one_line(e)}") for j in todo if j.line not in seen]
            write_results(folder, rows)
            raise
        write_results(folder, rows)
    finally:
        marker.unlink(missing_ok=True)
    return sorted(rows, key=lambda r: r["line"])


def summary(rows: Sequence[dict]) -> str:
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "skipped")}
    skipped = f", {count['skipped']} skipped (output already there)" if count["skipped"] else ""
    return f"{count['done']} done, {count['failed']} failed{skipped}"


__all__ = ["Job", "KEYS", "RESULTS", "default_seed", "parse", "read", "plan", "render", "write_png", "run",
           "in_process", "summary"]
