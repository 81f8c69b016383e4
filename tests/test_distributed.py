"""bonsai.distributed on a local Ray runtime (2 CPUs, started once here): the same files and pixels as the
single-process batch, bad lines reported, resumable, a worker that dies mid-batch loses nothing."""

import contextlib
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import bonsai
from bonsai import cli, jobs, testing

ray = pytest.importorskip("ray")
from bonsai import distributed  # noqa: E402

TIMEOUT_S = 120  # every render_jobs call is bounded; the file takes ~60 s on 2 busy cores

LINES = [{"prompt": "a red kite", "size": "32x32", "steps": 2, "seed": 3},
         {"prompt": "a blue moon", "width": 48, "height": 32, "steps": 2},
         {"prompt": "a green cat", "size": "32x32", "steps": 2, "out": "cat"},
         "not json",
         {"prompt": "a small boat", "size": "32x32", "steps": 2},
         {"prompt": "a tall tree", "width": 48, "height": 32, "steps": 2, "seed": 11},
         {"prompt": "a wide field", "size": "32x48", "steps": 2, "out": "sub/field.png"},
         {"prompt": "an old house", "size": "32x32", "steps": 2},
         {"prompt": "a fast car", "width": 48, "height": 32, "steps": 2}]
NAMES = ["job-0001.png", "job-0002.png", "cat.png", "job-0005.png", "job-0006.png", "sub/field.png", "job-0008.png",
         "job-0009.png"]
BATCH = 2


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("ray") / "tiny-ternary-gemlite", layout="gemlite",
                              kind="ternary", seed=0)


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def single(repo, jobs_file, tmp_path_factory):
    """The single-process `bonsai batch` of the same file (its `main`, in this process), with one torch thread as
    each worker has (Ray sets OMP_NUM_THREADS to a worker's CPUs): the reference folder, pixel for pixel."""
    import torch

    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main(["batch", str(jobs_file), "--model", str(repo), "--backend", "torch", "--dtype", "float32",
                             "--out", str(out), "--batch-size", str(BATCH), "-q"])
    finally:
        torch.set_num_threads(threads)
    err = err.getvalue()
    assert code == 1 and "line 4: FAILED: not valid JSON" in err and "8 done, 1 failed" in err, err[-2000:]
    return out


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _same_pixels(a, b):
    # The same chunks (so the same batch composition) and one torch thread on both sides: the same pixels.
    return np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB")))


def _render(repo, jobs_file, out, **kw):
    return distributed.render_jobs(jobs_file, str(repo), out, workers=2, batch_size=BATCH, backend="torch",
                                   dtype="float32", progress=False, timeout_s=TIMEOUT_S, **kw)


def test_two_workers_match_the_single_process_batch_and_a_rerun_skips(runtime, repo, jobs_file, single, tmp_path):
    out = tmp_path / "out"
    rows = _render(repo, jobs_file, out)
    assert _files(out) == _files(single) == sorted(NAMES + ["results.jsonl"])
    for name in NAMES:
        assert _same_pixels(out / name, single / name), name
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    bad = rows[3]
    assert bad["status"] == "failed" and bad["error"].startswith("not valid JSON") and bad["out"] is None
    done = [r for r in rows if r["status"] == "done"]
    assert [r["out"] for r in done] == NAMES and all(r["attempt"] == 1 for r in done)
    assert {r["worker"].split("@")[0] for r in done} == {"ray-0", "ray-1"}
    ref = {r["line"]: r for r in map(json.loads, (single / "results.jsonl").read_text().splitlines())}
    for r in done:
        assert (r["seed"], r["size"], r["batch"]) == (ref[r["line"]]["seed"], ref[r["line"]]["size"],
                                                      ref[r["line"]]["batch"])
    assert [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()] == rows

    mtimes = {n: (out / n).stat().st_mtime_ns for n in NAMES}
    t0 = time.perf_counter()
    again = _render(repo, jobs_file, out)
    assert [r["status"] for r in again] == ["skipped"] * 3 + ["failed"] + ["skipped"] * 5
    assert {n: (out / n).stat().st_mtime_ns for n in NAMES} == mtimes
    assert time.perf_counter() - t0 < 5  # no worker was started


def test_a_worker_that_dies_mid_batch_loses_nothing(runtime, repo, jobs_file, single, tmp_path):
    marker = tmp_path / "died"
    out = tmp_path / "out"
    rows = _render(repo, jobs_file, out, runtime_env={"env_vars": {distributed.EXIT_ONCE_ENV: str(marker)}})
    assert marker.exists()  # a worker did exit at the start of its second chunk
    assert _files(out) == sorted(NAMES + ["results.jsonl"])  # every output once, no temp file
    for name in NAMES:
        assert _same_pixels(out / name, single / name), name
    done = [r for r in rows if r["status"] == "done"]
    assert [r["out"] for r in done] == NAMES
    retried = [r for r in done if r["attempt"] == 2]
    assert 1 <= len(retried) <= BATCH, rows  # the chunk in flight when its worker died, rendered again
    assert all(r["timings"] is not None for r in retried)
    # Ray restarted the worker: a process id that rendered nothing before the death may appear, never a lost job.
    assert len({r["line"] for r in rows}) == len(rows) == len(LINES)


def test_bad_arguments_fail_before_ray_starts_workers(runtime, repo, jobs_file, tmp_path):
    with pytest.raises(bonsai.BonsaiValueError, match="workers"):
        distributed.render_jobs(jobs_file, str(repo), tmp_path / "a", workers=0, progress=False)
    with pytest.raises(bonsai.BonsaiValueError, match="GPU"):
        distributed.render_jobs(jobs_file, str(repo), tmp_path / "b", workers=1, gpus_per_worker=1,
                                progress=False)
    with pytest.raises(bonsai.BonsaiValueError, match="CPU"):
        distributed.render_jobs(jobs_file, str(repo), tmp_path / "c", workers=3, progress=False)


def test_a_model_that_does_not_load_fails_every_job_in_one_line(runtime, jobs_file, tmp_path):
    rows = distributed.render_jobs(jobs_file, str(tmp_path / "no-model"), tmp_path / "out", workers=1,
                                   backend="torch", progress=False, timeout_s=TIMEOUT_S)
    failed = [r for r in rows if r["line"] != 4]
    assert all(r["status"] == "failed" and "no Ray worker left" in r["error"] and "no-model" in r["error"]
               and "\n" not in r["error"] for r in failed), failed[0]
    assert _files(tmp_path / "out") == ["results.jsonl"]


def test_a_worker_that_cannot_see_the_output_folder_takes_no_work(repo, tmp_path):
    # The Worker class itself, without Ray: a node where the run's marker file is not visible (no shared folder).
    worker = distributed.Worker(0, str(repo), "torch", {})
    marker = jobs.mark(tmp_path / "out")
    assert worker.info(str(marker))["error"] is None
    error = distributed.Worker(0, str(repo), "torch", {}).info(str(tmp_path / "elsewhere" / marker.name))["error"]
    assert "not visible" in error and "shared folder" in error


def test_cli_batch_on_ray(runtime, repo, single, tmp_path):
    # The console script with --ray, as a user runs it (it joins the runtime this module started, or starts one).
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n\n" + json.dumps(LINES[2]) + "\n")  # cat on line 3: seed 3
    r = subprocess.run([sys.executable, "-m", "bonsai.cli", "batch", str(path), "--model", str(repo), "--backend",
                        "torch", "--dtype", "float32", "--out", str(tmp_path / "out"), "--ray", "--workers", "1",
                        "--batch-size", "2", "-q"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 done, 0 failed" in r.stderr
    assert _files(tmp_path / "out") == ["cat.png", "job-0001.png", "results.jsonl"]
    assert _same_pixels(tmp_path / "out" / "cat.png", single / "cat.png")
