"""`bonsai generate` with --lora, --image, --init-image and --strength, through the CLI's `main` (test_cli runs the
console script as a process)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai import testing
from test_cli import bonsai_main

pytest.importorskip("peft")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("cli-img") / "tiny", layout="gemlite", seed=2)


def test_generate_with_lora_image_and_init_image(repo, tmp_path, capsys):
    from test_lora_images_render import write_peft_lora
    from test_pipeline import _diffusers_pipeline

    lora = write_peft_lora(tmp_path / "lora", _diffusers_pipeline(repo).transformer)
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(ref)
    common = ["-p", "a small boat", "--model", repo, "--backend", "torch", "--dtype", "float32", "--seed", "4", "-q"]
    outs = {}
    for name, extra in {"plain": ["--size", "80x64"], "lora": ["--size", "80x64", "--lora", f"{lora}:0.5"],
                        "edit": ["--image", ref], "img2img": ["--init-image", ref, "--strength", "0.5"]}.items():
        r = bonsai_main(capsys, "generate", *common, *extra, "--out", tmp_path / f"{name}.png")
        assert r.returncode == 0, r.stderr
        outs[name] = Image.open(tmp_path / f"{name}.png")
        assert outs[name].size == (80, 64)
    meta = {k: json.loads(v.text["bonsai"]) for k, v in outs.items()}
    assert meta["lora"]["loras"] == {"pytorch_lora_weights": 0.5} and meta["plain"]["loras"] == {}
    assert meta["edit"]["references"] == 1 and meta["img2img"]["init_image"] and meta["img2img"]["strength"] == 0.5
    plain = np.asarray(outs["plain"]).astype(int)
    for name in ("lora", "edit", "img2img"):
        assert np.abs(np.asarray(outs[name]).astype(int) - plain).max() > 2, name


def test_image_argument_errors_come_before_loading(tmp_path, capsys):
    for extra, match in [(["--image", tmp_path / "none.png"], "--image: no such file"),
                         (["--strength", "0.5"], "--strength applies"),
                         (["--lora", "x:nan"], "scale")]:
        r = bonsai_main(capsys, "generate", "-p", "x", "--model", "prism-ml/none-gemlite", *extra)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_lora_flag_on_batch_and_serve(repo, tmp_path, capsys):
    from test_lora_images_render import write_peft_lora
    from test_pipeline import _diffusers_pipeline

    lora = write_peft_lora(tmp_path / "lora", _diffusers_pipeline(repo).transformer)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a boat", "size": "64x64", "seed": 4, "out": "boat.png"}\n')
    for extra, name in (([], "plain"), (["--lora", f"{lora}:0.5"], "lora")):
        r = bonsai_main(capsys, "batch", jobs, "--model", repo, "--backend", "torch", "--dtype", "float32", "-q",
                        *extra, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(tmp_path / n / "boat.png")).astype(int) for n in ("plain", "lora"))
    assert np.abs(a - b).max() > 2  # the batch rendered with the LoRA
    r = bonsai_main(capsys, "serve", "--model", repo, "--lora", "x:inf")
    assert r.returncode == 2 and "scale" in r.stderr and "Traceback" not in r.stderr, r.stderr
