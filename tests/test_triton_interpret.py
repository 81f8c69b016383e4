"""The fast path's Triton expand kernel, run by Triton's CPU interpreter, equals the dequantized weight exactly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Runs in a child process: TRITON_INTERPRET must be set before triton is first imported.
SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch
    from bonsai.backends.cuda.kernels import expand_lowbit
    from bonsai.quant import LowBitWeight

    def pack_np(q, bits):
        per = 8 // bits
        q = q.reshape(q.shape[0], -1, per).astype(np.uint8)
        out = np.zeros(q.shape[:2], np.uint8)
        for j in range(per):
            out |= q[:, :, j] << (j * bits)
        return out

    rng = np.random.default_rng(0)
    checked = 0
    for kind, bits in (("ternary", 2), ("binary", 1)):
        for n, k in ((8, 128), (24, 384), (5, 256)):
            t = rng.integers(-1, 2, (n, k)) if kind == "ternary" else rng.integers(0, 2, (n, k)) * 2 - 1
            s = (rng.random((n, k // 128)) * 2 - 1).astype(np.float32)
            q = t + 1 if kind == "ternary" else (t + 1) // 2
            packed = torch.from_numpy(pack_np(q, bits))
            for dt, npdt in ((torch.float32, np.float32), (torch.float16, np.float16)):
                out = torch.full((n, k), float("nan"), dtype=dt)
                expand_lowbit(packed, torch.from_numpy(s), bits, 128, k, out)
                # t is -1/0/+1: t * round(s) is exactly what any dequantizer must give.
                want = t.astype(npdt) * np.repeat(s.astype(npdt), 128, axis=1)
                assert np.array_equal(out.numpy(), want), (kind, n, k, dt)
                lw = LowBitWeight.from_codes(torch.from_numpy(t.astype(np.int8)), torch.from_numpy(s), kind)
                assert torch.equal(lw.packed, packed), (kind, n, k)
                assert torch.equal(out, lw.dequantize(dt)), (kind, n, k, dt)
                checked += 1
    print("OK", checked)
    """
)


def test_expand_kernel_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK 12"), proc.stdout
