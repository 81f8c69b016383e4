"""CUDA backend (bf16, CUDA graphs) with LoRA, reference images and image-to-image, against the torch backend in
bf16 on the same GPU: the same numbers up to bf16 kernel differences."""

import numpy as np
import pytest
import torch
from PIL import Image

import bonsai
from bonsai import testing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    repo = testing.write_repo(tmp_path_factory.mktemp("cuda-inputs") / "repo", "gemlite", "ternary", seed=4)
    return (bonsai.Pipeline.from_pretrained(repo, backend="cuda"),
            bonsai.Pipeline.from_pretrained(repo, backend="torch", device="cuda", dtype="bfloat16"))


def lora_file(path, config, rank=4):
    from safetensors.torch import save_file

    from bonsai.lora import lora_targets

    g = torch.Generator().manual_seed(0)
    save_file({key: t for name, (o, i) in lora_targets(config).items() for key, t in (
        (f"transformer.{name}.lora_A.weight", torch.randn(rank, i, generator=g) / i**0.5),
        (f"transformer.{name}.lora_B.weight", 0.3 * torch.randn(o, rank, generator=g) / rank**0.5))}, path)
    return path


def px(result):
    return np.asarray(result.image, np.float32)


def test_lora_edit_and_img2img_match_the_torch_backend(pipes, tmp_path):
    cuda, ref = pipes
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    refs = [Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 64, 3), dtype=np.uint8))]
    cases = {"plain": dict(width=96, height=64), "edit": dict(image=refs), "img2img": dict(init_image=init, strength=0.5)}
    plain = {}
    for name, kwargs in cases.items():
        a, b = px(cuda("a red fox", seed=3, progress=False, **kwargs)), px(ref("a red fox", seed=3, progress=False, **kwargs))
        plain[name] = a
        assert a.shape == b.shape and a.std() > 1.0
        assert np.abs(a - b).mean() < 3.0, (name, np.abs(a - b).mean())
    path = lora_file(tmp_path / "lora.safetensors", cuda.transformer_config)
    for pipe in pipes:
        pipe.load_lora(path, scale=0.8)
    for name, kwargs in cases.items():
        a, b = px(cuda("a red fox", seed=3, progress=False, **kwargs)), px(ref("a red fox", seed=3, progress=False, **kwargs))
        assert np.abs(a - b).mean() < 3.0, ("lora", name, np.abs(a - b).mean())
        assert np.abs(a - plain[name]).mean() > 3.0  # the LoRA changed the image (its CUDA graph was re-captured)
    for pipe in pipes:
        pipe.unload_lora()
    again = px(cuda("a red fox", seed=3, progress=False, **cases["plain"]))
    assert np.array_equal(again, plain["plain"])


def test_batch_matches_single_images_in_bf16(pipes):
    cuda, _ = pipes
    batch = cuda(["a cat", "a dog", "a cow"], width=64, height=64, seed=[1, 2, 3], batch_size=3, progress=False)
    for i, prompt in enumerate(["a cat", "a dog", "a cow"]):
        alone = np.asarray(cuda(prompt, width=64, height=64, seed=i + 1, progress=False).image, np.float32)
        diff = np.abs(np.asarray(batch.images[i], np.float32) - alone)
        print(f"bf16 batch-of-3 image {i} vs alone: max {diff.max():.0f}, mean {diff.mean():.3f} /255")
        assert diff.mean() < 2.0


def test_kept_text_encoder_replays_graphs_equal_to_its_eager_forward(pipes):
    """The kept text encoder replays one CUDA graph per [B, S]: its features equal the eager forward's for new
    prompts (the static inputs refreshed), another batch size, and after the encoder left the GPU and came back
    (the graphs of its old tensors dropped)."""
    from bonsai.backends.torch.text_encoder import encode
    from bonsai.prompt import tokenize

    cuda, _ = pipes
    rt = cuda.runtime
    eager = {}

    def check(prompts):
        ids, mask = tokenize(cuda.tokenizer, prompts, rt.text_config.max_length)
        got = rt.encode(ids, mask).float()
        want = encode(rt.text_encoder.get(), ids.cuda(), mask.cuda(), rt.text_config.feature_layers).float()
        eager[prompts] = want
        assert ((got - want).norm() / want.norm()).item() < 1e-3, prompts

    for prompts in (("a cat",), ("a dog on a red sofa",), ("a cat", "a dog on a red sofa")):
        check(prompts)
    # (other tests of this module may have captured other batch sizes on the shared pipeline already)
    assert {(1, rt.text_config.max_length), (2, rt.text_config.max_length)} <= set(rt._encoder_graphs)
    # different prompts give different features, so stale static inputs would have failed above
    assert ((eager[("a cat",)] - eager[("a dog on a red sofa",)]).norm() / eager[("a cat",)].norm()).item() > 0.1
    rt.text_encoder.release()  # to pinned host memory; its device tensors are new when it comes back
    check(("a cow",))
    assert set(rt._encoder_graphs) == {(1, rt.text_config.max_length)}


def test_decode_replays_one_graph_per_size_equal_to_the_eager_decode(pipes):
    """The untiled decode replays a CUDA graph per (latents shape, size): its pixels equal the eager decode's for
    new latents of a size seen before (the static input refreshed); a tiled size stays eager."""
    cuda, _ = pipes
    rt = cuda.runtime
    g = torch.Generator(device="cuda").manual_seed(0)
    for height, width in ((64, 64), (48, 80), (64, 64), (16, 1040)):
        x = torch.randn(1, height // 16 * (width // 16), 128, device="cuda", dtype=rt.dtype, generator=g)
        got = rt.decode(x, height, width)
        want = rt.vae.decode_latents(x, height, width, tile=width > 1024)
        assert got.shape == (1, height, width, 3) and got.std() > 1.0
        assert np.array_equal(got, want), (height, width)
    graphed = {key[1:] for key in rt._graphs if key[0] == "decode"}
    assert {((1, 16, 128), 64, 64), ((1, 15, 128), 48, 80)} <= graphed
    assert all((h, w) != (16, 1040) for _, h, w in graphed)


def test_low_memory_mode_offloads_the_text_encoder_and_transformer(pipes, tmp_path):
    cuda, _ = pipes
    low = bonsai.Pipeline.from_pretrained(cuda.model, backend="cuda", memory="low")
    assert low.runtime.memory == "low" and not low.runtime.cuda_graphs
    path = lora_file(tmp_path / "lora.safetensors", cuda.transformer_config)
    for lora in (None, path):  # with a LoRA: its branches travel to the host and back with the transformer
        if lora is not None:
            for pipe in (low, cuda):
                pipe.load_lora(lora, scale=0.8)
        for prompt in ("a cat", "a dog"):  # the second brings both back from pinned host memory
            a = np.asarray(low(prompt, width=64, height=64, seed=1, progress=False).image, np.float32)
            assert not low.runtime.memory_report()["text_encoder_resident"]
            assert all(t.is_cuda for t in low.runtime.transformer.state_dict().values())
            b = np.asarray(cuda(prompt, width=64, height=64, seed=1, progress=False).image, np.float32)
            assert np.abs(a - b).max() <= 2.0, (lora, prompt)
    for pipe in (low, cuda):
        pipe.unload_lora()
    report = cuda.runtime.memory_report()
    assert report["text_encoder_resident"]  # "auto" on a big GPU keeps it
    # the graphs' pools are reserved, not allocated: the reserved peak is at least the allocated one
    assert report["peak_reserved_gb"] >= report["reserved_gb"] > 0 and report["peak_reserved_gb"] >= report["peak_gb"]
