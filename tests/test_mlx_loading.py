"""The MLX strict-load wrapper, and the released MLX low-bit checks shared by the torch and MLX readers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from safetensors.torch import load_file, save_file  # noqa: E402

from bonsai import testing, weights  # noqa: E402
from bonsai.backends.mlx import transformer as mt  # noqa: E402
from bonsai.backends.mlx import vae as mv  # noqa: E402
from bonsai.backends.mlx.loading import load_strict  # noqa: E402
from bonsai.errors import BonsaiValueError  # noqa: E402

from bonsai.layouts import MLX

KEY = "transformer_blocks.0.attn.to_q"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.blocks = [nn.Linear(3, 3, bias=False)]


def good():
    return {"proj.weight": mx.zeros((3, 4)), "proj.bias": mx.zeros((3,)), "blocks.0.weight": mx.ones((3, 3))}


def one_line_error(fn) -> str:
    with pytest.raises(BonsaiValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_strict_loads_every_parameter():
    model = load_strict(Tiny(), good(), "tiny.safetensors")
    np.testing.assert_array_equal(np.array(model.blocks[0].weight), np.ones((3, 3)))
    np.testing.assert_array_equal(np.array(model.proj.bias), np.zeros(3))


@pytest.mark.parametrize("change, words", [
    (lambda w: w.pop("proj.bias"), ["missing ['proj.bias']"]),
    (lambda w: w.update({"proj.extra": mx.zeros(1)}), ["unexpected ['proj.extra']"]),
    (lambda w: w.update({"blocks.0.weight": mx.zeros((3, 4))}),
     ["wrong shapes", "blocks.0.weight: expected (3, 3), got (3, 4)"]),
    (lambda w: w.update({"proj.bias": np.zeros(3, np.float32)}), ["proj.bias", "mx.array"]),  # MLX's own check
])
def test_load_strict_names_the_file_first(change, words):
    w = good()
    change(w)
    msg = one_line_error(lambda: load_strict(Tiny(), w, "some/dir/tiny.safetensors", "tiny weights"))
    assert msg.startswith("some/dir/tiny.safetensors: tiny weights")
    for word in words:
        assert word in msg


def test_vae_and_transformer_loaders_name_the_file(tmp_path):
    state = testing.random_vae(testing.TINY_VAE)
    del state["decoder.conv_out.bias"]
    msg = one_line_error(lambda: mv.load_vae_decoder(state, testing.TINY_VAE, source="r/vae/x.safetensors"))
    assert msg.startswith("r/vae/x.safetensors: ") and "missing ['decoder.conv_out.bias']" in msg
    file = _write_mlx(tmp_path, drop="proj_out.weight")
    msg = one_line_error(lambda: mt.load_transformer_folder(tmp_path, dtype="float32"))
    assert msg.startswith(f"{file}: ") and "missing ['proj_out.weight']" in msg


def _write_mlx(folder, kind="ternary", replace=None, drop=None):
    """A tiny transformer-packed-mflux/ with some tensors replaced (torch values) or one dropped -> its weights file."""
    testing.write_transformer(folder, "mlx", kind)
    file = folder / mt.PACKED_DIR / MLX.weight_file
    tensors = load_file(file)
    tensors.update(replace or {})
    tensors.pop(drop, None)
    save_file(tensors, file)
    return file


def _ternary(folder):
    t = load_file(_write_mlx(folder))
    return t[f"{KEY}.weight"], t[f"{KEY}.scales"], t[f"{KEY}.biases"]


def _both_readers(folder) -> tuple[str, str]:
    """The error of the torch reader (LowBitWeight.from_mlx) and of the MLX loader on the same folder."""
    torch_msg = one_line_error(lambda: weights.read_transformer(folder))
    mlx_msg = one_line_error(lambda: mt.load_transformer_folder(folder, dtype="float32"))
    return torch_msg, mlx_msg


def _rejected_identically(folder, rule: str):
    file = str(folder / mt.PACKED_DIR / MLX.weight_file)
    torch_msg, mlx_msg = _both_readers(folder)
    for msg in (torch_msg, mlx_msg):
        assert file in msg and rule in msg
    # the same words from the key on: one check, two callers
    assert torch_msg[torch_msg.index(KEY):] == mlx_msg[mlx_msg.index(KEY):]


def test_bad_ternary_bias_rejected_identically(tmp_path):
    w, s, b = _ternary(tmp_path / "ref")
    b = b.clone()
    b[0, 0] = -b[0, 0]  # one group breaks biases == -scales
    _write_mlx(tmp_path / "a", replace={f"{KEY}.biases": b})
    _rejected_identically(tmp_path / "a", f"{KEY}.biases: ternary packs need biases == -scales")


def test_ternary_code3_rejected_identically(tmp_path):
    w, s, b = _ternary(tmp_path / "ref")
    w = w.clone()
    w.view(torch.int32)[3, 1] |= 3 << 10  # field 5 of one word holds code 3
    _write_mlx(tmp_path / "a", replace={f"{KEY}.weight": w})
    _rejected_identically(tmp_path / "a", f"{KEY}.weight: ternary code 3 is not a valid trit")


def test_bad_binary_bias_and_dtype_rejected_identically(tmp_path):
    t = load_file(_write_mlx(tmp_path / "ref", "binary"))
    _write_mlx(tmp_path / "a", "binary", replace={f"{KEY}.biases": t[f"{KEY}.biases"] * 2})  # -s instead of -s/2
    _rejected_identically(tmp_path / "a", f"{KEY}.biases: binary packs need biases == -scales / 2")
    _write_mlx(tmp_path / "b", "binary", replace={f"{KEY}.weight": t[f"{KEY}.weight"].view(torch.int32)})
    _rejected_identically(tmp_path / "b", f"{KEY}.weight: must be a 2-D uint32 array, got int32")


def test_the_clean_pack_loads_in_both(tmp_path):
    """The checks accept what a correct writer produces, and both readers hold the released codes."""
    _write_mlx(tmp_path)
    tw = weights.read_transformer(tmp_path)
    model, kind = mt.load_transformer_folder(tmp_path, dtype="float32")
    assert kind == tw.kind == "ternary"
    lin = model.transformer_blocks[0].attn.to_q
    assert isinstance(lin, nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(lin.weight).view(np.uint8), tw.tensors[f"{KEY}.weight"].packed.numpy())
