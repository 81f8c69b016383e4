"""The seeded noise: bonsai's copy of torch < 2.12's bf16 CPU normals against bits drawn by torch itself."""

import hashlib

import pytest
import torch

from bonsai import latents as L
from bonsai.errors import BonsaiValueError

# sha256 (first 32 hex digits) of the int16 view of torch.randn(shape, generator=manual_seed(seed), dtype=bfloat16)
# on the CPU, and its first values, printed by torch 2.10.0 and 2.11.0 (the same bits from both).
TORCH_2_11 = [
    (0, (1, 128, 4, 4), "0cdc0b6c60d8213a72221f2188a39eea", [1.4609375, 0.291015625, 0.9609375, 1.5703125]),
    (7, (1, 128, 32, 32), "c42bd2fb5f6c37d2c06d154b8a2d536d", [-0.97265625, -0.306640625, -0.42578125, 2.15625]),
    (2**32 + 5, (1, 128, 3, 5), "474bde1ec46a2b770786ccf5b47c6c43", [0.96875, 1.3984375, 1.8828125, -0.09228515625]),
    (-3, (1, 3, 7, 5), "af85cea2373932a6b763c12ad131e476", [-0.1630859375, 0.2109375, -0.69140625, -1.5078125]),
    (123456789, (17,), "ed4787990b50158afcb7e8fbf2e9c8c5", [1.578125, 0.51953125, -0.9609375, -1.6796875]),
    # 8.4M (radius, angle) byte pairs: every one of the 65,536 table entries, many times over
    (99, (1, 128, 512, 256), "81cfd87568fb4dbdf526773bcec80d04", [0.154296875, -0.1630859375, -1.6015625, -1.2421875]),
]


@pytest.mark.parametrize("seed,shape,digest,first", TORCH_2_11)
def test_scalar_bf16_randn_equals_the_bits_of_torch_2_11(seed, shape, digest, first):
    x = L.randn_bf16_scalar(seed, shape)
    assert x.shape == shape and x.dtype == torch.bfloat16
    assert x.flatten()[:4].tolist() == first
    assert hashlib.sha256(x.view(torch.int16).numpy().tobytes()).hexdigest()[:32] == digest


@pytest.mark.parametrize("seed,height,width", [(0, 512, 512), (5, 64, 48), (2**40 + 1, 80, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_noise_equals_torch_randn_of_the_installed_torch(seed, height, width, dtype):
    # diffusers draws with torch.randn, so the installed torch's bits are the reference, whichever path noise() takes
    shape = (1, 128, height // 16, width // 16)
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got = L.noise(seed, height, width, dtype=dtype)
    assert torch.equal(got.view(torch.int16) if dtype == torch.bfloat16 else got,
                       ref.view(torch.int16) if dtype == torch.bfloat16 else ref)


def test_scalar_bf16_randn_needs_16_values():
    with pytest.raises(BonsaiValueError, match="at least 16"):
        L.randn_bf16_scalar(0, (1, 15))
