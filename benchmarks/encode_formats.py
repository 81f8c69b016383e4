"""Response encoding cost of `bonsai serve`: `encode_image` (what the server runs) per output_format, on a synthetic
1024x1024 RGB image (gradients + Gaussian noise, sigma 6), on this machine's CPU. Prints a table, writes OUT.json/.md.

    python benchmarks/encode_formats.py --out benchmarks/results/cpu-encode
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from common import median, new_result, write_results

CASES = (("png", None), ("jpeg", 100), ("jpeg", 90), ("webp", 100), ("webp", 80))


def synthetic_image(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], -1)
    rgb = rgb + np.random.default_rng(0).normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/cpu-encode")
    args = p.parse_args(argv)
    from bonsai.serve.app import encode_image

    img = synthetic_image(args.size)
    ref = np.asarray(img, np.float32)
    rows = []
    for fmt, quality in CASES:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            data = encode_image(img, fmt, quality)
            times.append(time.perf_counter() - t0)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        rows.append(dict(format=fmt, quality=quality, ms=median(times) * 1e3, kib=len(data) / 1024,
                         mean_diff=float(np.abs(back - ref).mean())))
    result = dict(new_result(argv), size=args.size, rows=rows)
    lines = [f"Command: `{result['command']}`  ", f"Date: {result['date']}; {result['versions']['machine']}.", "",
             f"`bonsai.serve.app.encode_image` on a synthetic {args.size}x{args.size} image, median of "
             f"{args.repeat}:", "", "| output_format | quality | time | size | mean diff (/255) |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['quality'] if r['quality'] is not None else '-'} | {r['ms']:.0f} ms | "
              f"{r['kib']:.0f} KiB | {r['mean_diff']:.2f} |" for r in rows]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
