"""One SDXL base UNet call at S = 1024 with and without the capture, measured in one run: seconds and peak
memory of the call, the capture's ratio and extra memory, and how far the captured call's output moves.

A full-size SDXL base UNet of the bundled configuration (refdiff/configs/sdxl) with random weights (timing and
memory do not depend on the weights), built directly in one dtype (default bf16: the UNet is 10.3 GB in fp32).
The call is the official preset's: the CFG batch of 2 (["", prompt]) at t = 51 on a 128 x 128 latent, SDXL's
added conditioning built as refdiff.diffusion does; the capture is the preset's factor-4 layers
(down_blocks.2, mid_block, up_blocks.0: 60 attn2 layers) recording logits (refdiff.diffusion.capture_processors).
The two kinds alternate (plain, captured, plain, ...) after one warm-up call of each, so drift of the machine
reaches both alike. Text encoders have the real widths but two layers (text encoding is not in the call).

Run: python -m benchmarks.sdxl_unet_call [--dtype bf16] [--threads 2] [--rounds 2] [--out results.json]
(``--tiny``: refdiff.testing's tiny SDXL at S = 128, for CI; its numbers mean nothing.)
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from benchmarks.report import emit
from benchmarks.memory import MemoryMonitor
from benchmarks.sdxl_capture import DTYPES, PROMPT, build
from refdiff.capture import LayerSelector
from refdiff.diffusion import SDComponents, capture_processors, encode_text, unet_output
from refdiff.stores import AttentionStore

TIMESTEP = 51  # the official preset's first UNet step (strength 0.1, 20 DDIM steps)


def one_call(sd: SDComponents, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
             captured: bool) -> dict[str, Any]:
    """Time and peak memory of one UNet call on the CFG batch, with or without the capture."""
    store = AttentionStore(kind="logits")
    selector = LayerSelector(4, ("down", "mid", "up"))
    t = torch.tensor([TIMESTEP] * x.shape[0])
    gc.collect()
    with torch.no_grad(), MemoryMonitor("cpu") as mon:
        scope = capture_processors(sd.unet, selector, store, "logits", [1, 0]) if captured else nullcontext([])
        with scope as layers:
            start = time.perf_counter()
            out = unet_output(sd, x, t, context, pooled)
            seconds = time.perf_counter() - start
    return {"s": seconds, "rss_delta_mb": mon.reading.rss_delta_mb, "rss_peak_mb": mon.reading.rss_peak_mb,
            "layers": len(layers), "out": out.float()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL at S = 128 (CI smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    size = 128 if args.tiny else 1024
    sd = build("sdxl", dtype, args.tiny)
    context, pooled = encode_text(sd, PROMPT, use_cfg=True)
    x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    one_call(sd, x, context, pooled, False)  # warm-up of each kind
    one_call(sd, x, context, pooled, True)
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "captured": []}
    for r in range(args.rounds):
        for kind in ("plain", "captured"):
            rows[kind].append(one_call(sd, x, context, pooled, kind == "captured"))
            print(r, kind, round(rows[kind][-1]["s"], 2), file=sys.stderr, flush=True)
    plain, captured = rows["plain"], rows["captured"]
    moved = max(float((a["out"] - b["out"]).abs().max()) for a, b in zip(plain, captured))
    scale = float(plain[0]["out"].abs().max())

    def med(kind: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(row[key] for row in kind), 3)

    out = {"what": "one SDXL base UNet call (CFG batch 2, t = 51) with and without the factor-4 capture (logits)",
           "dtype": args.dtype, "tiny": bool(args.tiny), "image_size": size, "latent": list(x.shape[-2:]),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
           "unet_params": sum(p.numel() for p in sd.unet.parameters()),
           "captured_layers": captured[0]["layers"],
           "plain_s": [round(row["s"], 3) for row in plain], "captured_s": [round(row["s"], 3) for row in captured],
           "plain_median_s": med(plain, "s"), "captured_median_s": med(captured, "s"),
           "ratio_captured_over_plain": round(med(captured, "s") / med(plain, "s"), 3),
           "plain_rss_delta_mb": med(plain, "rss_delta_mb"), "captured_rss_delta_mb": med(captured, "rss_delta_mb"),
           "capture_extra_mb": round(med(captured, "rss_delta_mb") - med(plain, "rss_delta_mb"), 1),
           "rss_peak_mb": max(row["rss_peak_mb"] for row in plain + captured),
           "output_max_abs_change": moved, "output_max_abs": scale}
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
