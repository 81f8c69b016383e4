"""The `bonsai` console script on a tiny synthetic repo: run as a subprocess, as a user would, where the process
matters (a whole render, the parser's exit status); its `main` in this process for the rest (each subprocess pays
the ~5 s import of torch and transformers again)."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from bonsai import testing


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-binary-mlx"
    testing.write_repo(path, layout="mlx", kind="binary", transformer_config=testing.TINY_TRANSFORMER, seed=1)
    return path


def bonsai_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bonsai.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def bonsai_main(capsys, *args):
    """`bonsai ARGS` through `bonsai.cli.main` in this process: a CompletedProcess as `bonsai_cli` returns."""
    from bonsai.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_generate_writes_png_with_metadata(repo, tmp_path):
    out = tmp_path / "img.png"
    r = bonsai_cli("generate", "-p", "a small boat", "--model", repo, "--backend", "torch", "--size", "80x48",
                   "--seed", "4", "--steps", "2", "--style", "comic", "-q", "--out", out)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (80, 48)
    meta = json.loads(img.text["bonsai"])
    assert meta["seed"] == 4 and meta["steps"] == 2 and meta["style"] == "comic" and meta["variant"] == "binary-mlx"
    assert "encode" in r.stderr and "denoise" in r.stderr


def test_generate_bad_size_is_a_clear_error(repo, tmp_path):
    r = bonsai_cli("generate", "-p", "x", "--model", repo, "--backend", "torch", "--size", "100x64", "--out",
                   tmp_path / "x.png")
    assert r.returncode == 2
    assert "multiple of 16" in r.stderr and "Traceback" not in r.stderr


def test_batch_reports_failures_per_line(repo, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"prompt": "a kite", "size": "32x32", "seed": 1, "steps": 1, "out": "kite.png"}),
        json.dumps({"prompt": "bad size", "width": 30, "height": 32}),
        "not json",
        json.dumps({"prompt": "a moon", "aspect": "2:1", "long_edge": 64, "steps": 1}),
    ]))
    r = bonsai_main(capsys, "batch", jobs, "--model", repo, "--backend", "torch", "--out", tmp_path / "out")
    assert r.returncode == 1
    assert "line 2: FAILED" in r.stderr and "line 3: FAILED" in r.stderr
    assert Image.open(tmp_path / "out" / "kite.png").size == (32, 32)
    assert Image.open(tmp_path / "out" / "job-0004.png").size == (64, 32)
    assert "2 done, 2 failed" in r.stderr


def test_info_and_convert(repo, tmp_path, capsys):
    r = bonsai_main(capsys, "info", repo)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "binary" and info["layout"] == "mlx"
    dst = tmp_path / "compact"
    r = bonsai_main(capsys, "convert", repo, dst, "--to", "compact")
    assert r.returncode == 0, r.stderr
    info = json.loads(bonsai_main(capsys, "info", dst).stdout)
    assert info["kind"] == "binary" and info["layout"] == "compact"


def test_unknown_backend_rejected_by_parser(repo):
    r = bonsai_cli("generate", "-p", "x", "--model", repo, "--backend", "metal")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_convert_onto_a_non_empty_folder_is_a_one_line_error(tmp_path, capsys):
    from bonsai.cli import main

    testing.write_transformer(tmp_path / "src", "mlx", "binary")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "src"), str(dst), "--to", "compact"]) == 2
    err = capsys.readouterr().err
    assert err == f"bonsai: error: {dst} exists and is not empty; convert writes into a new or empty folder\n"
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
