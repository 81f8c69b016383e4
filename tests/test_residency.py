"""Text-encoder residency, the prompt-feature cache and the memory estimate, on the torch backend (CPU)."""

import numpy as np
import pytest
import torch

import bonsai
from bonsai import memory, testing
from bonsai.backends.torch import runtime as torch_runtime
from bonsai.backends.torch.runtime import LazyModel

GB = 1 << 30


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("residency") / "repo", seed=1)


def test_keep_resident_against_a_fake_budget():
    need = memory.render_bytes(1, 1024 * 1024)
    assert 3.2 * GB < need < 4 * GB  # the fitted 1024x1024 activations
    assert memory.render_bytes(4, 512 * 512) > memory.render_bytes(1, 512 * 512)
    assert memory.keep_resident(free_bytes=10 * GB, need_bytes=need)
    assert not memory.keep_resident(free_bytes=need, need_bytes=need)  # no room for the 25% margin
    assert memory.keep_resident(free_bytes=int(1.25 * need) + 1, need_bytes=need)


def test_lazy_model_keeps_drops_and_restores_from_host():
    events = []
    def offload(model, host):
        events.append("offload" if host is None else "reuse")
        return host or f"host:{model}"

    lm = LazyModel(lambda: events.append("disk") or "model", keep=True, free=lambda: events.append("free"),
                   offload=offload, restore=lambda h: events.append("restore") or h.removeprefix("host:"))
    assert lm.get() == "model" and lm.resident
    lm.done()  # kept
    assert lm.resident and events == ["disk"]
    lm.release()
    assert not lm.resident and events == ["disk", "offload", "free"]
    assert lm.get() == "model" and events[-1] == "restore"  # no second disk read
    lm.release()
    assert events[-2:] == ["reuse", "free"]  # the host copy is made once
    dropping = LazyModel(lambda: events.append("disk2") or "m2", keep=False)
    dropping.get()
    dropping.done()
    assert not dropping.resident


def test_auto_residency_frees_the_text_encoder_only_when_the_render_needs_the_room(repo, monkeypatch):
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch")
    te = pipe.runtime.text_encoder
    monkeypatch.setattr(torch_runtime, "available_bytes", lambda device: 64 * GB)
    first = pipe("a cat", width=64, height=64, seed=1, progress=False)
    assert te.resident  # plenty of room: kept for the next prompt
    monkeypatch.setattr(torch_runtime, "available_bytes", lambda device: memory.render_bytes(1, 64 * 64))
    second = pipe("a dog", width=64, height=64, seed=1, progress=False)
    assert not te.resident  # too little room next to the render's activations: freed before the denoise
    monkeypatch.setattr(torch_runtime, "available_bytes", lambda device: 64 * GB)
    third = pipe("a cat, again", width=64, height=64, seed=1, progress=False)
    assert te.resident and third.report.encoded == 1
    assert first.report.encoded == 1 and second.report.encoded == 1
    kept = bonsai.Pipeline.from_pretrained(repo, backend="torch", keep_text_encoder=False)
    kept("a cat", width=64, height=64, seed=1, progress=False)
    assert not kept.runtime.text_encoder.resident
    with pytest.raises(bonsai.BonsaiValueError, match="keep_text_encoder"):
        bonsai.Pipeline.from_pretrained(repo, backend="torch", keep_text_encoder="sometimes")


def test_repeated_prompts_skip_the_text_encoder(repo, monkeypatch):
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", feature_cache=2)
    calls = []
    encode = pipe.runtime.encode
    monkeypatch.setattr(pipe.runtime, "encode", lambda ids, mask: calls.append(len(ids)) or encode(ids, mask))
    a = pipe("a cat", width=64, height=64, seed=1, progress=False)
    b = pipe("a cat", width=64, height=64, seed=1, progress=False)
    assert calls == [1] and b.report.encoded == 0
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    pipe(["a cat", "a dog", "a dog"], width=64, height=64, seed=1, progress=False)
    assert calls == [1, 1]  # only "a dog" was new, encoded once for both images
    pipe("a cow", width=64, height=64, seed=1, progress=False)  # evicts the least recently used ("a cat")
    pipe("a cat", width=64, height=64, seed=1, progress=False)
    assert calls == [1, 1, 1, 1]
    pipe("a cat", width=64, height=64, seed=1, style="sketch", progress=False)  # another style is another prompt
    assert calls == [1, 1, 1, 1, 1]


def test_batched_images_equal_the_images_rendered_alone(repo):
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    prompts, seeds = ["a cat", "a dog", "a red kite", "a cow", "a boat"], [3, 9, 4, 1, 7]
    batched = pipe(prompts, width=64, height=48, seed=seeds, batch_size=4, progress=False)  # a batch of 4, then 1
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = pipe(p, width=64, height=48, seed=s, progress=False)
        diff = np.abs(np.asarray(batched.images[i], np.int16) - np.asarray(alone.image, np.int16))
        assert diff.max() <= 2, (i, diff.max())
        assert batched.images[i].info["bonsai_seed"] == s
    with pytest.raises(bonsai.BonsaiValueError, match="batch_size"):
        pipe("x", batch_size=0, progress=False)
