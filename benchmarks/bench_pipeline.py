"""What a user gets: `bonsai.Pipeline.from_pretrained(repo)` + `pipe(...)` on full-size synthetic repos, one run,
side by side (ours with the defaults, ours fp8, the same model dense bf16, gemlite as released, diffusers'
Flux2KleinPipeline in bf16), on a CUDA GPU.

    python benchmarks/bench_pipeline.py --repos /tmp/bonsai-repos --out benchmarks/results/h200-pipeline

Sections (--sections, comma list):
  load     Pipeline.from_pretrained per layout and kind (page cache warm: the second load of each), with its stages
  e2e      per implementation and size: first image, second image, warm median of 5 (distinct prompts, so every
           render runs the text encoder), stage times from Result.report, peak GPU memory allocated and reserved
           (reserved counts what the CUDA graphs use as they replay: their pools sit outside the allocated count)
  batch    images/s of pipe(prompts, batch_size=N) for N = 1, 2, 4, 8, and the bf16 pixel difference of a batched
           image against the same image rendered alone
  lowvram  memory="low": peak torch.cuda.max_memory_allocated of a 1024x1024 render, and its time; the defaults'
           text encoder released to pinned host memory and brought back (seconds each way). Run it in a process of
           its own: the pipelines of earlier sections leave memory allocated (2.69 GB alone, 3.24 after e2e)
  lora     denoise time per step with a rank-16 and a rank-64 LoRA on all 109 linears vs none, at 1024x1024
  peer     diffusers' Flux2KleinPipeline, dense bf16, random weights of the real shapes built in memory
Repos are written once by bonsai.testing.write_full_size_repo (random weights in the released layouts).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from common import PROMPTS, full_size_repo, header, median, new_result, sync, write_results

IMPLS = {"ours": {}, "ours_fp8": {"activations": "fp8"}, "ours_compile": {"compile": True},
         "ours_torch_elementwise": {"elementwise": "torch"},
         "dense_bf16": {"linear": "dense"}, "gemlite": {"linear": "gemlite"}}


def free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def render(pipe, prompt, size, **kwargs):
    sync()
    t0 = time.perf_counter()
    result = pipe(prompt, width=size, height=size, seed=0, progress=False, **kwargs)
    sync()
    return time.perf_counter() - t0, result


def bench_load(root, layouts, kinds):
    import bonsai

    rows = []
    for layout in layouts:
        for kind in kinds:
            repo = full_size_repo(root, layout, kind, device="cuda")
            for attempt in range(2):  # the first warms the page cache
                free()
                sync()
                t0 = time.perf_counter()
                pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
                sync()
                seconds = time.perf_counter() - t0
                report = dict(pipe.load_report, **{f"runtime.{k}": v for k, v in pipe.runtime.load_report.items()})
                del pipe
            rows.append(dict(layout=layout, kind=kind, load_s=seconds, stages=report))
            print(f"load {kind}-{layout}: {seconds:.2f} s {report}", flush=True)
    free()
    return rows


def bench_e2e(repo, impls, sizes, reps=5):
    """Each impl renders the same prompts and seed; its first image per size is compared with the first impl's
    (fp8's error after the whole 4-step loop and the decode)."""
    import numpy as np

    import bonsai

    rows, firsts = [], {}
    for impl in impls:
        free()
        t0 = time.perf_counter()
        pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda", **IMPLS[impl])
        load_s = time.perf_counter() - t0
        prompts = iter(PROMPTS)
        for size in sizes:
            first, out = render(pipe, next(prompts), size)
            pixels = np.asarray(out.images[0], np.int16)
            diff = np.abs(pixels - firsts.setdefault(size, pixels))
            second, _ = render(pipe, next(prompts), size)
            runs = [render(pipe, next(prompts), size) for _ in range(reps)]
            reports = [r.report for _, r in runs]
            row = dict(impl=impl, size=size, load_s=load_s, first_s=first, second_s=second,
                       total_s=median(t for t, _ in runs), encode_s=median(r.encode_s for r in reports),
                       denoise_s=median(r.denoise_s for r in reports), decode_s=median(r.decode_s for r in reports),
                       peak_gb=max(r.peak_memory_gb for r in reports), memory=reports[-1].memory,
                       peak_reserved_gb=max(r.memory["peak_reserved_gb"] for r in reports),
                       max_diff_vs_first=int(diff.max()), mean_diff_vs_first=float(diff.mean()))
            rows.append(row)
            print(f"e2e {impl:10s} {size}: first {first:.2f} s, second {second * 1e3:.0f} ms, warm median "
                  f"{row['total_s'] * 1e3:.0f} ms (encode {row['encode_s'] * 1e3:.0f}, denoise "
                  f"{row['denoise_s'] * 1e3:.0f}, decode {row['decode_s'] * 1e3:.0f}), peak {row['peak_gb']:.2f} GB",
                  flush=True)
        del pipe
    free()
    return rows


def bench_batch(repo, sizes, ns=(1, 2, 4, 8)):
    import numpy as np

    import bonsai

    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
    rows = []
    for size in sizes:
        alone = {}
        for n in ns:
            prompts = PROMPTS[:n]
            pipe(prompts, width=size, height=size, seed=list(range(n)), batch_size=n, progress=False)  # capture
            times = []
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                out = pipe(prompts, width=size, height=size, seed=list(range(n)), batch_size=n, progress=False)
                sync()
                times.append(time.perf_counter() - t0)
            seconds = min(times)
            if n == 1:
                alone = {0: np.asarray(out.images[0], np.int16)}
            diff = np.abs(np.asarray(out.images[0], np.int16) - alone[0])
            rows.append(dict(size=size, batch=n, seconds=seconds, images_per_s=n / seconds,
                             max_diff_vs_alone=int(diff.max()), mean_diff_vs_alone=float(diff.mean())))
            print(f"batch {size} N={n}: {n / seconds:.2f} images/s ({seconds:.3f} s), image 0 vs alone: max "
                  f"{diff.max()}, mean {diff.mean():.3f}/255", flush=True)
    del pipe
    free()
    return rows


def bench_lowvram(repo, size=1024):
    import bonsai

    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda", memory="low")
    first, r1 = render(pipe, PROMPTS[0], size)
    warm, r2 = render(pipe, PROMPTS[1], size)
    row = dict(size=size, first_s=first, warm_s=warm, peak_gb=max(r1.report.peak_memory_gb, r2.report.peak_memory_gb),
               report=str(r2.report), memory=r2.report.memory)
    print(f"lowvram {size}: first {first:.2f} s, warm {warm:.2f} s, peak allocated {row['peak_gb']:.2f} GB", flush=True)
    del pipe
    free()
    # The defaults on a card without room for it: the text encoder waits in pinned host memory between prompts.
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda", keep_text_encoder="auto")
    render(pipe, PROMPTS[0], size)
    te = pipe.runtime.text_encoder
    offload, restore = [], []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        te.release()
        t1 = time.perf_counter()
        te.get()
        sync()
        offload.append(t1 - t0)
        restore.append(time.perf_counter() - t1)
    row.update(te_first_offload_s=offload[0], te_offload_s=median(offload[1:]), te_restore_s=median(restore))
    print(f"text encoder to pinned host memory: first {offload[0]:.3f} s (pins), then {row['te_offload_s']:.3f} s; "
          f"back to the GPU {row['te_restore_s']:.3f} s", flush=True)
    del pipe, te
    free()
    return [row]


def random_lora(path: Path, rank: int, config) -> Path:
    """A diffusers-style LoRA file on every linear (100 low-bit + 9 dense), random small values."""
    import torch
    from safetensors.torch import save_file

    from bonsai.lora import lora_targets

    g = torch.Generator().manual_seed(rank)
    state = {}
    for name, (out_f, in_f) in lora_targets(config).items():
        state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).bfloat16()
        state[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3).bfloat16()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path


def bench_lora(repo, root, size=1024, ranks=(16, 64), reps=3):
    import bonsai

    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
    rows = []
    for rank in (0, *ranks):
        if rank:
            pipe.unload_lora()
            pipe.load_lora(random_lora(root / f"lora-r{rank}.safetensors", rank, pipe.transformer_config))
        render(pipe, PROMPTS[0], size)  # capture with these branches
        steps = [render(pipe, PROMPTS[0], size)[1].report.denoise_s / 4 for _ in range(reps)]  # cached prompt
        rows.append(dict(rank=rank, size=size, step_ms=1e3 * median(steps)))
        print(f"lora rank {rank}: {rows[-1]['step_ms']:.1f} ms per step (denoise / 4)", flush=True)
    base = rows[0]["step_ms"]
    for r in rows:
        r["vs_no_lora"] = r["step_ms"] / base
    del pipe
    free()
    return rows


def peer_render(pipe, prompt, size) -> float:
    import torch

    sync()
    t0 = time.perf_counter()
    pipe(prompt=prompt, height=size, width=size, num_inference_steps=4, guidance_scale=1.0,
         generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
    sync()
    return time.perf_counter() - t0


def bench_peer(repo, sizes, reps=5):
    """diffusers' Flux2KleinPipeline in bf16: the same klein-4B shapes, dense, random weights, a 36-layer Qwen3."""
    import diffusers
    import torch
    import transformers
    from transformers import AutoTokenizer

    from bonsai import testing, weights
    from bonsai.config import FLUX2_VAE, KLEIN_4B

    dtype, dev = torch.bfloat16, "cuda"
    with torch.device(dev):
        transformer = diffusers.Flux2Transformer2DModel(**{k: getattr(KLEIN_4B, k) for k in (
            "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio",
            "axes_dims_rope", "rope_theta", "eps", "guidance_embeds")}).to(dtype)
        vae = diffusers.AutoencoderKLFlux2(block_out_channels=FLUX2_VAE.block_out_channels).to(dtype)
        text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**testing.QWEN3_4B)).to(dtype)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in testing.SCHEDULER_CONFIG.items()
                                                        if not k.startswith("_")})
    pipe = diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, transformer=transformer,
                                        tokenizer=AutoTokenizer.from_pretrained(weights.tokenizer_dir(repo)),
                                        is_distilled=True)
    rows = []
    for size in sizes:
        first = peer_render(pipe, PROMPTS[0], size)
        torch.cuda.reset_peak_memory_stats()
        times = [peer_render(pipe, p, size) for p in PROMPTS[1:1 + reps]]
        rows.append(dict(impl="diffusers_bf16", size=size, first_s=first, total_s=median(times),
                         peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                         peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9))
        print(f"peer diffusers {size}: first {first:.2f} s, warm median {rows[-1]['total_s'] * 1e3:.0f} ms, peak "
              f"{rows[-1]['peak_gb']:.2f} GB", flush=True)
    del pipe, transformer, vae, text_encoder
    free()
    return rows


def diff_cell(r) -> str:
    return f"{r['max_diff_vs_first']} / {r['mean_diff_vs_first']:.2f}" if "max_diff_vs_first" in r else "-"


def markdown(result) -> str:
    lines = header(result)
    if result.get("load"):
        lines += ["`Pipeline.from_pretrained(repo, backend=\"cuda\")`, page cache warm (second load in the process):",
                  "", "| repo | load | stages |", "|---|---|---|"]
        lines += [f"| {r['kind']}-{r['layout']} | {r['load_s']:.2f} s | "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()) + " |" for r in result["load"]]
    rows = result.get("e2e", []) + result.get("peer", [])
    if rows:
        lines += ["", f"End to end through `Pipeline` ({result['repo']}): encode + 4 steps + decode, distinct "
                  "prompts; warm = median of 5 after the first two images; the first image against the first "
                  "row's (same prompt and seed, /255):", "",
                  "| implementation | size | warm | encode | denoise | decode | first image | second image | peak "
                  "allocated | peak reserved | max / mean diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            stage = lambda k: f"{r[k] * 1e3:.0f} ms" if k in r else "-"  # noqa: E731
            second = f"{r['second_s'] * 1e3:.0f} ms" if "second_s" in r else "-"
            lines.append(f"| {r['impl']} | {r['size']}² | {r['total_s'] * 1e3:.0f} ms | {stage('encode_s')} | "
                         f"{stage('denoise_s')} | {stage('decode_s')} | {r['first_s']:.2f} s | {second} | "
                         f"{r['peak_gb']:.2f} GB | {r['peak_reserved_gb']:.2f} GB | {diff_cell(r)} |")
    if result.get("batch"):
        lines += ["", "Batched denoise (`pipe(prompts, batch_size=N)`, defaults), best of 2; image 0 of the batch vs "
                  "the same prompt and seed alone (bf16, /255):", "",
                  "| size | N | images/s | seconds | max diff | mean diff |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['size']}² | {r['batch']} | {r['images_per_s']:.2f} | {r['seconds']:.3f} | "
                  f"{r['max_diff_vs_alone']} | {r['mean_diff_vs_alone']:.3f} |" for r in result["batch"]]
    if result.get("lowvram"):
        r = result["lowvram"][0]
        lines += ["", f"memory=\"low\" at {r['size']}²: peak allocated {r['peak_gb']:.2f} GB, first image "
                  f"{r['first_s']:.2f} s, warm {r['warm_s']:.2f} s ({r['report']}).", "",
                  f"Text encoder released by the defaults (`keep_text_encoder=\"auto\"` without room): to pinned host "
                  f"memory {r['te_first_offload_s']:.3f} s the first time (pinning), {r['te_offload_s']:.3f} s after; "
                  f"back to the GPU {r['te_restore_s']:.3f} s (median of 3)."]
    if result.get("lora"):
        lines += ["", "LoRA on all 109 linears (low-rank branch beside the packed weights), 1024², denoise time / 4:",
                  "", "| rank | step | vs no LoRA |", "|---|---|---|"]
        lines += [f"| {r['rank'] or 'none'} | {r['step_ms']:.1f} ms | {r['vs_no_lora']:.3f}x |" for r in result["lora"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", default="/tmp/bonsai-repos", help="where the synthetic full-size repos are written")
    p.add_argument("--out", default="benchmarks/results/pipeline")
    p.add_argument("--sections", default="load,e2e,batch,lowvram,lora,peer")
    p.add_argument("--layouts", default="gemlite,mlx,compact,unpacked")
    p.add_argument("--kinds", default="ternary,binary")
    p.add_argument("--impls", default="ours,ours_fp8,ours_compile,dense_bf16,gemlite")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repo", default="ternary-gemlite", help="the repo of the e2e/batch/lowvram/lora sections")
    args = p.parse_args(argv)
    root, sizes = Path(args.repos), [int(s) for s in args.sizes.split(",")]
    kind, layout = args.repo.split("-")
    result = dict(new_result(argv), repo=args.repo)
    sections = args.sections.split(",")

    def save():
        write_results(args.out, result, markdown(result))

    if "load" in sections:
        result["load"] = bench_load(root, args.layouts.split(","), args.kinds.split(","))
        save()
    repo = full_size_repo(root, layout, kind, device="cuda")
    for name, fn in (("e2e", lambda: bench_e2e(repo, args.impls.split(","), sizes)),
                     ("batch", lambda: bench_batch(repo, sizes)), ("lowvram", lambda: bench_lowvram(repo)),
                     ("lora", lambda: bench_lora(repo, root)), ("peer", lambda: bench_peer(repo, sizes))):
        if name in sections:
            try:
                result[name] = fn()
            except Exception as e:  # one failing section must not cost the others' numbers
                result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            save()


if __name__ == "__main__":
    main()
