"""The CUDA backend's fused elementwise kernels (under Triton's CPU interpreter) and the VAE's 16-bit GroupNorm,
against the unfused torch code in float64."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bonsai.backends.torch.transformer import modulate
from bonsai.backends.torch.vae import GroupNorm

SCRIPT = textwrap.dedent(
    """
    import torch
    from bonsai.backends.cuda.fused import modulate
    from bonsai.backends.torch.transformer import modulate as reference, split_mod

    g = torch.Generator().manual_seed(0)
    for b, n, d in [(1, 7, 96), (2, 5, 3072), (3, 4, 100)]:
        x = torch.randn(b, n, d, generator=g) * 3 + 1
        mod = torch.randn(b, 3 * d, generator=g)
        shift, scale, _ = split_mod(mod, 3)  # strided views, as the blocks pass them
        want = reference(x.double(), shift.double(), scale.double(), 1e-6)
        got = modulate(x, shift, scale, 1e-6)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert got.dtype == x.dtype and got.shape == x.shape, (got.dtype, got.shape)
        assert err <= 1e-6, (b, n, d, err)

    from bonsai.backends.cuda.fused import attention, rope
    from bonsai.backends.torch.transformer import apply_rope, attention as reference_attention
    from bonsai.latents import rope_tables
    for b, n, h, d in [(1, 6, 3, 16), (2, 5, 4, 32)]:
        ids = torch.randint(0, 50, (n, 4), generator=g)
        cos, sin = rope_tables(ids, (d // 4,) * 4, 2000.0)
        freqs = torch.complex(cos[:, ::2], sin[:, ::2])
        base = torch.randn(b, n, 2 * h, d, generator=g)
        x = base[:, :, ::2]  # strided over heads, as the single blocks' q/k views are
        want = apply_rope(x.transpose(1, 2).double(), freqs.to(torch.complex128)).transpose(1, 2)
        got = rope(x, freqs)
        assert got.is_contiguous() and ((got.double() - want).norm() / want.norm()).item() <= 1e-6
        q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
        a, r = attention(q, k, v, freqs), reference_attention(q, k, v, freqs)
        assert ((a - r).norm() / r.norm()).item() <= 1e-5
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_modulate_and_rope_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


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
