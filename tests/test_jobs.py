"""bonsai.jobs: batch lines checked one by one, safe output paths, atomic writes, resumable runs, batched renders."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bonsai
from bonsai import jobs, testing


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("jobs") / "tiny-ternary-gemlite", layout="gemlite",
                              kind="ternary", seed=0)


@pytest.fixture(scope="module")
def pipe(repo):
    return bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _no_load():
    raise AssertionError("the model was loaded")


GOOD = {"prompt": "a kite", "size": "32x32", "steps": 1}

# (line, key the one-line reason must name)
BAD_LINES = [
    ('{"prompt": "x", "colour": "red"}', "colour"),
    ('{"prompt": "x", "size": "32x32", "width": 32}', "width"),
    ('{"prompt": "x", "size": "32x32", "aspect": "1:1"}', "aspect"),
    ('{"prompt": ["a", "b"]}', "prompt"),
    ('{"prompt": 3}', "prompt"),
    ('{"size": "32x32"}', "prompt"),
    ('{"prompt": "   "}', "prompt"),
    ('[1, 2]', "JSON object"),
    ('"just a string"', "JSON object"),
    ('{"prompt": "x", ', "JSON"),
    ('{"prompt": "x", "size": "32by32"}', "size"),
    ('{"prompt": "x", "width": 30, "height": 32}', "width"),
    ('{"prompt": "x", "width": 32.0, "height": 32}', "width"),
    ('{"prompt": "x", "height": 8192}', "height"),
    ('{"prompt": "x", "steps": 0}', "steps"),
    ('{"prompt": "x", "steps": 1000}', "steps"),
    ('{"prompt": "x", "steps": "4"}', "steps"),
    ('{"prompt": "x", "seed": -1}', "seed"),
    ('{"prompt": "x", "seed": true}', "seed"),
    ('{"prompt": "x", "seed": [1]}', "seed"),
    ('{"prompt": "x", "seed": 4294967296}', "seed"),
    ('{"prompt": "x", "style": "nope"}', "style"),
    ('{"prompt": "x", "aspect": "nan:1"}', "aspect"),
    ('{"prompt": "x", "aspect": "1:1", "long_edge": 0}', "long_edge"),
    ('{"prompt": "x", "out": "/tmp/x.png"}', "out"),
    ('{"prompt": "x", "out": "../x.png"}', "out"),
    ('{"prompt": "x", "out": "a/../../x.png"}', "out"),
    ('{"prompt": "x", "out": "C:\\\\x.png"}', "out"),
    ('{"prompt": "x", "out": "x.jpg"}', "out"),
    ('{"prompt": "x", "out": 5}', "out"),
    ('{"prompt": "x", "out": ""}', "out"),
    ('{"prompt": "x", "out": "."}', "out"),
    ('{"prompt": "x", "out": "./"}', "out"),
    ('{"prompt": "x", "out": "a\\nb.png"}', "out"),
    ('{"prompt": "x", "out": "\\ud800.png"}', "out"),
    ('{"prompt": "x", "out": "' + "n" * 300 + '"}', "out"),
    ('{"prompt": "x", "style": ["comic"]}', "style"),
]


@pytest.mark.parametrize("text, key", BAD_LINES)
def test_bad_line_reported_with_one_line_reason_and_the_rest_go_on(tmp_path, text, key):
    path = _write(tmp_path / "jobs.jsonl", [GOOD, text, {**GOOD, "prompt": "a moon"}])
    good, failed = jobs.read(path, tmp_path / "out")
    assert [j.line for j in good] == [1, 3]
    assert [r["line"] for r in failed] == [2] and failed[0]["status"] == "failed"
    reason = failed[0]["error"]
    assert key in reason and "\n" not in reason, reason


def test_undecodable_line_and_duplicate_out_are_bad_lines(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"prompt": "a", "out": "x"}\n{"prompt": "\xff"}\n{"prompt": "b", "out": "x.png"}\n'
                     b'{"prompt": "c", "out": "job-0005"}\n{"prompt": "d"}\n')
    good, failed = jobs.read(path, tmp_path / "out")
    assert [j.line for j in good] == [1, 4]
    assert {r["line"]: r["error"] for r in failed} == {
        2: "line is not UTF-8 text",
        3: "out 'x.png' is also the output of line 1",
        5: "out 'job-0005.png' is also the output of line 4"}


def test_job_defaults_seed_and_names(tmp_path):
    path = _write(tmp_path / "jobs.jsonl", ["", {"prompt": "a"}, {"prompt": "b", "seed": 7, "out": "sub/b"},
                                            {"prompt": "c", "aspect": "2:1", "long_edge": 64, "seed": None,
                                             "out": "C.PNG", "style": "comic", "steps": 2}])
    good, failed = jobs.read(path, tmp_path / "out")
    assert not failed
    root = (tmp_path / "out").resolve()
    a, b, c = good
    assert (a.line, a.seed, a.out, a.path, a.width, a.height, a.steps) == (2, 2, "job-0002.png", root / "job-0002.png",
                                                                           512, 512, 4)
    assert (b.seed, b.out, b.path) == (7, "sub/b.png", root / "sub" / "b.png")
    assert (c.seed, c.out, c.width, c.height, c.style, c.steps) == (4, "C.PNG", 64, 32, "comic", 2)


def test_symlink_out_of_the_folder_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)
    path = _write(tmp_path / "jobs.jsonl", [{"prompt": "x", "out": "link/x.png"}])
    good, failed = jobs.read(path, out)
    assert not good and "outside the output folder" in failed[0]["error"]


def test_missing_jobs_file_and_bad_batch_size(tmp_path):
    with pytest.raises(bonsai.BonsaiFileNotFoundError, match="jobs file"):
        jobs.run(tmp_path / "nope.jsonl", tmp_path / "out", jobs.in_process(_no_load))
    path = _write(tmp_path / "jobs.jsonl", [GOOD])
    with pytest.raises(bonsai.BonsaiValueError, match="batch_size"):
        jobs.run(path, tmp_path / "out", jobs.in_process(_no_load), batch_size=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(bonsai.BonsaiValueError, match="is a file"):
        jobs.run(path, tmp_path / "file", jobs.in_process(_no_load))


def test_plan_groups_same_size_in_order():
    path_jobs = [jobs.parse(obj, i, __import__("pathlib").Path("/o")) for i, obj in enumerate([
        {"prompt": "a", "size": "32x32"}, {"prompt": "b", "size": "48x32"}, {"prompt": "c", "size": "32x32"},
        {"prompt": "d", "size": "32x32", "steps": 2}, {"prompt": "e", "size": "32x32"},
        {"prompt": "f", "size": "32x32", "style": "comic"}], 1)]
    chunks = jobs.plan(path_jobs, 2)
    assert [[j.prompt for j in c] for c in chunks] == [["a", "c"], ["e"], ["b"], ["d"], ["f"]]


MIXED = [{"prompt": "a red kite", "size": "32x32", "steps": 2, "seed": 3},
         {"prompt": "a blue moon", "width": 48, "height": 32, "steps": 2},
         {"prompt": "a green cat", "size": "32x32", "steps": 2, "out": "cat"},
         {"prompt": "a small boat", "size": "32x32", "steps": 2},
         {"prompt": "a tall tree", "width": 48, "height": 32, "steps": 2, "seed": 11}]


def test_batched_equals_each_job_alone_and_leaves_no_temp_files(tmp_path, pipe):
    path = _write(tmp_path / "jobs.jsonl", MIXED)
    rows = jobs.run(path, tmp_path / "b3", jobs.in_process(lambda: pipe), batch_size=3, progress=False)
    assert [r["status"] for r in rows] == ["done"] * 5
    assert [r["batch"] for r in rows] == [3, 2, 3, 3, 2]
    names = ["job-0001.png", "job-0002.png", "cat.png", "job-0004.png", "job-0005.png"]
    assert sorted(os.listdir(tmp_path / "b3")) == sorted(names + ["results.jsonl"])
    assert [json.loads(l)["out"] for l in (tmp_path / "b3" / "results.jsonl").read_text().splitlines()] == names
    seeds = [3, 2, 3, 4, 11]
    for job, name, seed in zip(MIXED, names, seeds):
        w, h = (32, 32) if job.get("size") else (48, 32)
        alone = np.asarray(pipe(job["prompt"], width=w, height=h, steps=2, seed=seed, progress=False).image)
        got = _pixels(tmp_path / "b3" / name)
        assert got.shape == (h, w, 3) and np.abs(got - alone).max() <= 2, name
        assert json.loads(Image.open(tmp_path / "b3" / name).text["bonsai"])["seed"] == seed


def test_rerun_skips_and_overwrite_renders_again(tmp_path, pipe):
    path = _write(tmp_path / "jobs.jsonl", MIXED[:2] + ["oops"])
    out = tmp_path / "out"
    first = jobs.run(path, out, jobs.in_process(lambda: pipe), progress=False)
    assert [r["status"] for r in first] == ["done", "done", "failed"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = jobs.run(path, out, jobs.in_process(_no_load), progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped", "failed"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    (out / "job-0002.png").unlink()
    resumed = jobs.run(path, out, jobs.in_process(lambda: pipe), progress=False)
    assert [r["status"] for r in resumed] == ["skipped", "done", "failed"]
    redone = jobs.run(path, out, jobs.in_process(lambda: pipe), overwrite=True, progress=False)
    assert [r["status"] for r in redone] == ["done", "done", "failed"]
    assert all(p.stat().st_mtime_ns > mtimes[p.name] for p in out.glob("*.png"))
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_output_written_by_this_run_is_not_rendered_again(tmp_path):
    # A retry after a worker died: what that worker wrote in this run stays, even with overwrite.
    calls = []

    def fake_pipe(prompts, **kwargs):
        calls.append(prompts)
        raise RuntimeError("fake pipe")

    out = tmp_path / "out"
    since = jobs.mark(out).stat().st_mtime_ns
    (job,) = jobs.read([{"prompt": "x", "size": "32x32"}], out)[0]
    Image.new("RGB", (32, 32)).save(job.path)
    os.utime(job.path, ns=(since + 1, since + 1))  # written by this run
    rows = jobs.render(fake_pipe, [job], overwrite=True, since_ns=since)
    assert [r["status"] for r in rows] == ["done"] and not calls
    os.utime(job.path, ns=(since, since))  # the same tick as the start: an earlier run's file
    rows = jobs.render(fake_pipe, [job], overwrite=True, since_ns=since)
    assert calls == [["x"]] and rows[0]["status"] == "failed" and rows[0]["error"] == "RuntimeError: fake pipe"
    rows = jobs.render(fake_pipe, [job], overwrite=False, since_ns=since)
    assert rows[0]["status"] == "skipped" and len(calls) == 1


def test_a_file_that_cannot_be_written_fails_alone(tmp_path, pipe, monkeypatch):
    from bonsai import pipeline

    save = pipeline.save_png

    def save_png(image, path):  # a read-only subfolder (chmod does not stop root, who runs CI here)
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        save(image, path)

    monkeypatch.setattr(pipeline, "save_png", save_png)
    out = tmp_path / "out"
    path = _write(tmp_path / "jobs.jsonl", [{**MIXED[0], "out": "locked/a"}, {**MIXED[0], "seed": 5}])
    rows = jobs.run(path, out, jobs.in_process(lambda: pipe), batch_size=2, progress=False)
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["error"].startswith("cannot write locked/a.png: PermissionError") and rows[1]["batch"] == 2
    assert _files(out) == ["job-0002.png", "locked", "results.jsonl"]


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from bonsai import pipeline

    def broken(image, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "save_png", broken)
    with pytest.raises(OSError, match="disk full"):
        jobs.write_png(Image.new("RGB", (16, 16)), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_one_bad_job_in_a_batch_fails_alone(tmp_path, pipe):
    # Over the text encoder's 512 tokens: only found once tokenized, so it passes the line checks.
    path = _write(tmp_path / "jobs.jsonl", [{**MIXED[0], "seed": 1}, {**MIXED[0], "prompt": "cat " * 700}])
    rows = jobs.run(path, tmp_path / "out", jobs.in_process(lambda: pipe), batch_size=2, progress=False)
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "tokens" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert sorted(os.listdir(tmp_path / "out")) == ["job-0001.png", "results.jsonl"]


def test_cli_checks_every_line_before_loading_the_model(tmp_path):
    path = _write(tmp_path / "jobs.jsonl", ['{"prompt": "x", "steps": 0}', '{"prompt": "x", "out": "../x.png"}'])
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bonsai.cli", "batch", str(path), "--model", str(tmp_path / "no-model"),
                        "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 1, r.stderr
    assert "line 1: FAILED: steps must be in [1, 50], got 0" in r.stderr
    assert "line 2: FAILED: out must stay inside the output folder" in r.stderr
    assert "0 done, 2 failed" in r.stderr and "no-model" not in r.stderr and "Traceback" not in r.stderr
    assert elapsed < 10, elapsed  # no model load (a CI box under load; ~0.5 s when idle)
    r = subprocess.run([sys.executable, "-m", "bonsai.cli", "batch", str(tmp_path / "nope.jsonl"), "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "jobs file" in r.stderr and "Traceback" not in r.stderr


def test_importing_jobs_imports_neither_torch_nor_ray():
    code = "import sys, bonsai, bonsai.jobs, bonsai.distributed; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_model_that_does_not_load_still_leaves_a_row_per_line(tmp_path):
    path = _write(tmp_path / "jobs.jsonl", [GOOD, "[]"])

    def load():
        raise bonsai.BonsaiFileNotFoundError("model folder /nope not found")

    with pytest.raises(bonsai.BonsaiFileNotFoundError):
        jobs.run(path, tmp_path / "out", jobs.in_process(load), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"]) for r in rows] == [(1, "failed"), (2, "failed")]
    assert rows[0]["error"] == "not rendered: BonsaiFileNotFoundError: model folder /nope not found"
    assert os.listdir(tmp_path / "out") == ["results.jsonl"]  # the run's marker is gone too
