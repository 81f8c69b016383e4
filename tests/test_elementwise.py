"""The VAE's 16-bit GroupNorm and the transformer's modulation, against float64 references."""

from __future__ import annotations

import pytest
import torch

from bonsai.backends.torch.transformer import modulate
from bonsai.backends.torch.vae import GroupNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_16bit_path_is_the_float64_group_norm_rounded(dtype):
    norm = GroupNorm(4, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(32))
        norm.bias.copy_(0.1 * torch.randn(32))
    x = (torch.randn(2, 32, 9, 7) * 5 + 2).to(dtype)
    want = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
    got = norm(x)
    assert got.dtype == dtype
    # one rounding to the 16-bit dtype: within half an ulp of the exact value (relative 2^-8 for bf16)
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    assert ((got.double() - want).abs() <= ulp * want.abs() + 1e-6).all()
    assert torch.equal(norm(x.float()), torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, 1e-6))


def test_modulate_reference_is_layer_norm_then_affine():
    x, shift, scale = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64), \
        torch.randn(2, 1, 8, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(modulate(x, shift, scale, 1e-6), (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale) + shift)
