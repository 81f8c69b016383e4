"""CUDA cold start: time to first image in a fresh process, from a full-size synthetic repo on disk.

    python benchmarks/cold_start.py --repo /tmp/bonsai-4b --out benchmarks/results/h100-cold

Writes (once) a repo in the released gemlite ternary layout: the real klein-4B transformer and FLUX.2 VAE shapes
with random weights, a Qwen3-4B-shaped HQQ 4-bit text encoder (27 of 36 layers: all the features read; random
codes) and a small tokenizer. Then times fresh processes that do what a user's script does (import bonsai,
Pipeline.from_pretrained(repo, backend="cuda"), render twice): first with empty caches (Triton kernels, our GEMM
choices, gemlite configs), then again with the caches the first one left. Prints a table, writes OUT.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=27,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
import bonsai
t1 = time.perf_counter()
pipe = bonsai.Pipeline.from_pretrained(sys.argv[1], backend="cuda")
torch.cuda.synchronize()
t2 = time.perf_counter()
size = int(sys.argv[2])
times = []
for seed in (0, 1):
    t = time.perf_counter()
    out = pipe("a bonsai tree on a desk, studio light", width=size, height=size, seed=seed, progress=False)
    times.append(time.perf_counter() - t)
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_image_s=times[0], second_image_s=times[1],
                      to_first_image_s=t2 - t0 + times[0], report=str(out.report),
                      peak_gb=torch.cuda.max_memory_allocated() / 1e9)))
"""


def write_repo(path: Path) -> None:
    """The synthetic full-size repo (skipped if `path` already holds one)."""
    import torch
    import transformers

    from bonsai import testing
    from bonsai.config import FLUX2_VAE, KLEIN_4B

    if (path / "model_index.json").is_file():
        return
    t0 = time.perf_counter()
    testing.write_repo(path, "gemlite", "ternary", transformer_config=KLEIN_4B, vae_config=FLUX2_VAE,
                       text_encoder_layers=4)  # the tiny text encoder is replaced below
    config = transformers.Qwen3Config(**QWEN3_4B, architectures=["Qwen3ForCausalLM"])
    g = torch.Generator().manual_seed(0)
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    template = testing.hqq_linear_state(torch.zeros(1, 64))

    def linear(out_f, in_f):  # random 4-bit codes and meta in hqq's serialized form (quantizing 2.7B is slow)
        rows = out_f * in_f // 64
        return {**template, "shape": torch.Size([out_f, in_f]),
                "W_q": torch.randint(0, 256, (rows // 2, 64), generator=g, dtype=torch.uint8),
                "scale": (torch.rand(rows, 1, generator=g) / 4 / in_f ** 0.5).half(),
                "zero": torch.full((rows, 1), 7.5, dtype=torch.float16)}

    state = {"model.embed_tokens.weight": torch.randn(config.vocab_size, h, generator=g).half(),
             "model.norm.weight": torch.ones(h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        state.update({f"{p}.self_attn.q_proj.weight": linear(q, h), f"{p}.self_attn.k_proj.weight": linear(kv, h),
                      f"{p}.self_attn.v_proj.weight": linear(kv, h), f"{p}.self_attn.o_proj.weight": linear(h, q),
                      f"{p}.mlp.gate_proj.weight": linear(f, h), f"{p}.mlp.up_proj.weight": linear(f, h),
                      f"{p}.mlp.down_proj.weight": linear(h, f)})
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            state[f"{p}.{norm}.weight"] = torch.ones(hd)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}.{norm}.weight"] = torch.ones(h)
    testing.write_hqq_text_encoder(path, config, state)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)


def run_child(repo: Path, size: int, cache: Path) -> dict:
    env = dict(os.environ, BONSAI_CACHE=str(cache / "bonsai"), TRITON_CACHE_DIR=str(cache / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(size)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), process_wall_s=wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="/tmp/bonsai-4b-synthetic")
    p.add_argument("--sizes", default="1024,512")
    p.add_argument("--out", default="benchmarks/results/cold")
    args = p.parse_args(argv)
    repo = Path(args.repo)
    write_repo(repo)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            for cache_state in ("empty caches", "warm caches"):
                if cache_state == "empty caches":
                    for d in cache.iterdir():
                        subprocess.run(["rm", "-rf", str(d)], check=True)
                row = dict(size=size, caches=cache_state, **run_child(repo, size, cache))
                rows.append(row)
                print(f"{size}x{size} {cache_state:12s} import {row['import_s']:.2f} s  load {row['load_s']:.2f} s  "
                      f"first image {row['first_image_s']:.2f} s  second {row['second_image_s']:.2f} s  "
                      f"process start to first image {row['to_first_image_s']:.2f} s", flush=True)
    import torch

    result = dict(command="python benchmarks/cold_start.py " + " ".join(argv or sys.argv[1:]),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Command: `{result['command']}`  ", f"Date: {result['date']}; {result['gpu']}; torch {result['torch']}.",
             "", "Fresh process per row: import bonsai, `Pipeline.from_pretrained(repo, backend=\"cuda\")` (defaults), "
             "two renders (4 steps). Repo: synthetic full-size gemlite ternary pack on local disk (page cache warm).", "",
             "| size | caches | import | load | first image | second image | process start to first image |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']}² | {r['caches']} | {r['import_s']:.2f} s | {r['load_s']:.2f} s | {r['first_image_s']:.2f} s "
              f"| {r['second_image_s']:.2f} s | {r['to_first_image_s']:.2f} s |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
