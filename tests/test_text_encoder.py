"""The torch Qwen3 text encoder (plain torch) vs transformers' Qwen3Model: hidden states after the feature layers,
every position (pads included: FLUX.2 klein feeds all max_length positions to the transformer)."""

from __future__ import annotations

import pytest
import torch

from bonsai import testing
from bonsai.backends.torch.text_encoder import encode, load_text_encoder
from bonsai.config import Qwen3Fields
from bonsai.errors import BonsaiValueError

transformers = pytest.importorskip("transformers")

LAYERS = (1, 3, 4)  # of 5: hidden_states[5] would be transformers' final-normed output


def _config(heads=4, kv=2, bias=False, rope_in_parameters=False, attn="sdpa", **extra):
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}} if rope_in_parameters
            else {"rope_theta": 1e6})
    return transformers.Qwen3Config(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=16, rms_norm_eps=1e-6, attention_bias=bias, tie_word_embeddings=True,
        max_position_embeddings=256, attn_implementation=attn, **rope, **extra)


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * (0.5 if v.ndim == 1 else 0.3) + (1.0 if "norm" in k else 0.0))
            for k, v in model.state_dict().items()}


def _ids_and_mask(B=3, S=24, seed=0, vocab=120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.int64)
    for b, n in enumerate([S, 9, 1, 17][:B]):  # one full row, short rows, a single real token
        mask[b, n:] = 0
        ids[b, n:] = 7  # the pad id
    return ids, mask


@pytest.mark.parametrize("kw", [dict(), dict(heads=4, kv=1), dict(heads=2, kv=2), dict(bias=True),
                                dict(rope_in_parameters=True), dict(attn="eager")],
                         ids=["gqa2", "gqa4", "mha", "bias", "rope_parameters", "eager-reference"])
def test_features_match_transformers_qwen3model(kw):
    config = _config(**kw)
    ref = transformers.Qwen3Model(config).eval()
    state = _random_state(ref, seed=1)
    ref.load_state_dict(state)
    ids, mask = _ids_and_mask(B=4)
    with torch.no_grad():
        hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    layers = (0, *LAYERS)
    want = torch.cat([hs[k] for k in layers], dim=-1)
    model = load_text_encoder(config, {f"model.{k}": v for k, v in state.items()}, layers=layers)
    assert len(model.layers) == max(layers)
    got = encode(model, ids, mask, layers)
    assert got.shape == want.shape == (4, 24, len(layers) * 64)
    # float32; vs the sdpa reference the features come out bitwise equal here, vs eager within 6e-7
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    # each row alone (no padding) gives the same real-token features: the mask, not the batch, decides
    for b in range(4):
        n = int(mask[b].sum())
        alone = encode(model, ids[b:b + 1, :n], mask[b:b + 1, :n], layers)
        assert ((alone[0] - got[b, :n]).norm() / got[b, :n].norm()).item() <= 1e-5  # other SDPA shapes


def test_config_from_file_dict_and_transformers_config_agree(tmp_path):
    """read_text_encoder's Qwen3Fields, a config dict and a transformers Qwen3Config build the same encoder."""
    from bonsai import weights

    config = testing.tiny_text_encoder_config(vocab_size=96, layers=4)
    state = testing.random_text_encoder(config, seed=2)
    testing.write_dense_text_encoder(tmp_path, config, state)
    fields, dense = weights.read_text_encoder(tmp_path, layers=3)
    assert isinstance(fields, Qwen3Fields) and fields.num_hidden_layers == 3
    assert transformers.Qwen3Config(**fields.to_dict()).rope_parameters["rope_theta"] == config.rope_parameters[
        "rope_theta"]
    ids, mask = _ids_and_mask(B=2, S=10, seed=3, vocab=96)
    outs = [encode(load_text_encoder(c, dense, layers=(1, 3)), ids, mask, (1, 3))
            for c in (fields, fields.to_dict(), config)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(BonsaiValueError, match="has 3 layers, features need 4"):
        load_text_encoder(fields, dense, layers=(4,))


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling must use the default RoPE"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
     "rope_parameters must use the default RoPE"),
    ("hidden_act", "gelu", "hidden_act must be 'silu'"),
    ("head_dim", "16", "head_dim must be an integer"),
])
def test_unsupported_config_is_refused_naming_the_field(field, value, message):
    d = {**_config().to_dict(), field: value}
    with pytest.raises(BonsaiValueError, match=f"te.json: {message}"):
        load_text_encoder(d, {}, layers=(1,), source="te.json")
