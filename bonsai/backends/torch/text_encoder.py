"""The Qwen3 text encoder through transformers, cut to the layers the features need."""

from __future__ import annotations

import torch
from torch import nn

from ...config import TextEncoderConfig
from ...errors import BonsaiValueError
from ...prompt import stack_features
from ...state import check_state

FEATURE_LAYERS = TextEncoderConfig.feature_layers  # the dataclass default: klein's (9, 18, 27)


def load_text_encoder(config, state: dict, device="cpu", dtype: torch.dtype = torch.float32, layers=FEATURE_LAYERS,
                      make_linear=None, source="text encoder"):
    """A transformers Qwen3Model with decoder layers [0, max(layers)) from a Qwen3ForCausalLM state dict.

    Values that are not tensors (packed `Int4Weight` linears) become `make_linear(weight, device=, dtype=)`.
    Strict (`bonsai.state.check_state`, naming `source`, the file the state came from).
    """
    import transformers

    from ...weights import qwen3_config

    n = max(layers)
    if config.num_hidden_layers < n:
        raise BonsaiValueError(f"{source}: text encoder has {config.num_hidden_layers} layers, features need {n}")
    config = qwen3_config(config.to_dict(), n)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.Qwen3Model(config)
    prefix = "model."
    wanted = {k.removeprefix(prefix): v for k, v in state.items()
              if k.startswith(prefix) and not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    check_state(source, {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in wanted.items()})
    packed = {k: v for k, v in wanted.items() if not isinstance(v, torch.Tensor)}
    if packed and make_linear is None:
        raise BonsaiValueError(f"{source}: packed linears ({next(iter(packed))}, ...) but no make_linear")
    for key, weight in packed.items():
        parent, _, name = key.removesuffix(".weight").rpartition(".")
        if not key.endswith(".weight") or not isinstance(getattr(model.get_submodule(parent), name), nn.Linear):
            raise BonsaiValueError(f"{source}: packed weight {key} is not a linear's weight")
        setattr(model.get_submodule(parent), name, make_linear(weight, device=device, dtype=dtype))
    dense = {k: v.to(device=device, dtype=dtype) for k, v in wanted.items() if k not in packed}
    result = model.load_state_dict(dense, strict=False, assign=True)
    replaced = tuple(k.removesuffix("weight") for k in packed)
    if result.unexpected_keys or any(not k.startswith(replaced) for k in result.missing_keys):
        raise BonsaiValueError(f"{source}: state dict did not load: {result}")
    # hidden_states[-1] is the final-normed output; the features want the raw output of the last layer kept.
    model.norm = nn.Identity()
    model.rotary_emb = type(model.rotary_emb)(config=config).to(device)  # its buffers were built on meta
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers=FEATURE_LAYERS) -> torch.Tensor:
    """int64 [B, S] ids and mask -> features [B, S, len(layers) * hidden]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return stack_features(out.hidden_states, layers)
