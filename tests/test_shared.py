"""Shared, backend-free pieces: scheduler, prompt template and tokenization, sizes and styles, text features."""

import numpy as np
import pytest
import torch

from bonsai.errors import BonsaiValueError
from bonsai import prompt, scheduler, sizes, testing, weights
from bonsai.config import SchedulerConfig
from bonsai.tokenizer import load_tokenizer


@pytest.mark.parametrize("steps, seq_len", [(4, 1024), (4, 4096), (4, 4608), (1, 16), (8, 2304), (50, 6)])
def test_sigmas_equal_diffusers_bit_for_bit(steps, seq_len):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    ref = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in testing.SCHEDULER_CONFIG.items()
                                                       if not k.startswith("_")})
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    ours = scheduler.sigmas(steps, seq_len, SchedulerConfig())
    assert torch.equal(torch.tensor(ours, dtype=torch.float32), ref.sigmas)


def test_sigmas_of_the_spec_tables():
    """flux2-klein.md §4.2: 512² and 1024² schedules."""
    np.testing.assert_allclose(scheduler.sigmas(4, 1024), [1.0, 0.9580854, 0.8839819, 0.7174966, 0.0], atol=1e-7)
    np.testing.assert_allclose(scheduler.sigmas(4, 4096), [1.0, 0.9673840, 0.9081439, 0.7671999, 0.0], atol=1e-7)
    assert scheduler.empirical_mu(1024, 4) == pytest.approx(2.0306897, abs=1e-6)
    with pytest.raises(ValueError, match="steps"):
        scheduler.sigmas(0, 1024)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    testing.write_tokenizer(folder)
    return load_tokenizer(folder)


def test_chat_template_and_padding(tokenizer):
    text = prompt.format_prompt(tokenizer, "a cat")
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids, mask = prompt.tokenize(tokenizer, ["a cat", "a much longer prompt about dogs"], 512)
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == torch.int64
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    n = int(mask[0].sum())
    assert mask[0, :n].all() and not mask[0, n:].any() and (ids[0, n:] == pad).all()  # right padding
    assert ids[0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    long = "word " * 40
    n = len(tokenizer(prompt.format_prompt(tokenizer, long))["input_ids"])
    full_ids, full_mask = prompt.tokenize(tokenizer, ["ok", long], n)
    assert full_ids.shape == (2, n) and full_mask[1].all()
    with pytest.raises(BonsaiValueError, match=rf"prompt\[1\] is {n} tokens .* at most {n - 1}"):
        prompt.tokenize(tokenizer, ["ok", long], n - 1)  # the reference would cut it silently


def test_text_features_are_hidden_states_9_18_27(tmp_path):
    """Our 27-layer text encoder vs transformers' full model with output_hidden_states (36-layer style indexing)."""
    import transformers

    from bonsai.backends.torch.text_encoder import encode, load_text_encoder

    config = testing.tiny_text_encoder_config(vocab_size=300, layers=30)
    state = testing.random_text_encoder(config, seed=1)
    ref = transformers.Qwen3ForCausalLM(config).eval()
    ref.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    want = torch.cat([hs[9], hs[18], hs[27]], dim=-1)
    model = load_text_encoder(config, state, layers=(9, 18, 27))
    assert len(model.layers) == 27
    got = encode(model, ids, mask, (9, 18, 27))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_size_rules_and_aspect_helper():
    sizes.check_size(512, 768)
    for w, h, match in [(500, 512, "width must be a multiple of 16"), (512, 520, "height"), (16, 512, r"\[32, 4096\]"),
                        (512.0, 512, "integer")]:
        with pytest.raises(ValueError, match=match):
            sizes.check_size(w, h)
    assert sizes.size_from_aspect("16:9", 1024) == (1024, 576)
    assert sizes.size_from_aspect("2:3", 1000) == (672, 1008)
    assert sizes.size_from_aspect("1:1", 512) == (512, 512)
    for bad in ("16-9", "0:1", "a:b"):
        with pytest.raises(ValueError, match="aspect"):
            sizes.size_from_aspect(bad)


def test_styles():
    assert list(sizes.STYLES) == ["comic", "illustration", "cartoon", "vector", "minimalist-vector", "sketch",
                                  "stickman", "infographic", "typography", "caricature"]
    assert sizes.apply_style("a fox.", "sketch").startswith("a fox, ")
    assert sizes.apply_style("a fox", None) == "a fox"
    with pytest.raises(ValueError, match="style must be one of"):
        sizes.apply_style("a fox", "baroque")


def test_tokenizer_dir_fallbacks(tmp_path):
    testing.write_tokenizer(tmp_path / "text_encoder-hqq-4bit" / "tokenizer")
    assert weights.tokenizer_dir(tmp_path) == tmp_path / "text_encoder-hqq-4bit" / "tokenizer"
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        weights.tokenizer_dir(tmp_path / "text_encoder-hqq-4bit" / "tokenizer")
