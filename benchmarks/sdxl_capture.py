"""The capture stage on SDXL base at S = 1024 beside SD 2.1 base at S = 512, measured in one run: seconds per
UNet step (the CFG batch of 2, factor-4 cross-attention captured as logits) and peak memory.

Full-size UNets of the bundled configurations (refdiff/configs/sd2, refdiff/configs/sdxl) with random weights
(timing and memory do not depend on the weights), in one dtype (default bf16: SDXL's UNet is 10.3 GB in fp32).
The text encoders have the real widths (SD 2.1: 1024; SDXL: CLIP-L 768 + CLIP-G 1280 with its projection)
but two layers: the text encoding is not part of the measured steps. The latent is random: the VAE is not
part of this stage either. Each model gets one warm-up step, then ``--steps`` measured steps (the official
preset runs 2: t = 51 and 1).

Run: python -m benchmarks.sdxl_capture [--dtype bf16] [--threads 2] [--steps 1|2] [--out results.json]
(``--tiny``: the tiny random models of refdiff.testing at S = 64 and 128, for CI; its numbers mean nothing.)
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.report import emit
from benchmarks.memory import MemoryMonitor
from refdiff.diffusion import SDComponents, run_capture
from refdiff.schedule import scaled_linear_alphas_cumprod
from refdiff.sd import bundled_config
from refdiff.testing.sd import (SD15_TEXT_CONFIG, SDXL_TEXT_G_CONFIG, SDXL_TEXT_L_CONFIG, TINY_TEXT_CONFIG,
                                TINY_UNET_CONFIG, _seeded, text_encoder_from_config,
                                text_encoder_with_projection_from_config, tiny_sdxl, unet_from_config)
from refdiff.tokenizer import OPEN_CLIP_PAD_TOKEN, clip_tokenizer

PROMPT = "the black horse jumping on the left, "
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` for the block (parameters are created in it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(name: str, dtype: torch.dtype, tiny: bool = False) -> SDComponents:
    """Random-weight SD 2.1 base ("sd2") or SDXL base ("sdxl"): full-size UNet, two-layer text encoders (tiny:
    refdiff.testing's tiny SD 2.x-shaped and SDXL-shaped models)."""
    from diffusers import UNet2DConditionModel

    if tiny and name == "sdxl":
        sd = tiny_sdxl(0, dtype=dtype)
        sd.vae = None
        return sd
    if tiny:
        with _seeded(0):
            unet = unet_from_config({**TINY_UNET_CONFIG, "use_linear_projection": True}, dtype=dtype)
            text = text_encoder_from_config(TINY_TEXT_CONFIG, dtype=dtype)
        return SDComponents(unet=unet, vae=None, text_encoder=text, tokenizer=clip_tokenizer(),
                            alphas_cumprod=scaled_linear_alphas_cumprod(0.00085, 0.012, 1000), dtype=dtype)

    short = {"num_hidden_layers": 2, "intermediate_size": 512}
    with _seeded(0), _default_dtype(dtype):  # built in dtype: SDXL's UNet never exists in fp32 (10.3 GB)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(bundled_config(name) / "unet")))
    unet = unet.eval().requires_grad_(False)
    with _seeded(0):
        if name == "sdxl":
            text = text_encoder_from_config({**SDXL_TEXT_L_CONFIG, **short}, dtype=dtype)
            text_2 = text_encoder_with_projection_from_config({**SDXL_TEXT_G_CONFIG, **short}, dtype=dtype)
            tokenizer_2 = clip_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN)
        else:
            text = text_encoder_from_config({**SD15_TEXT_CONFIG, "hidden_size": 1024, "num_attention_heads": 16,
                                             "hidden_act": "gelu", **short}, dtype=dtype)
            text_2 = tokenizer_2 = None
    return SDComponents(unet=unet, vae=None, text_encoder=text, tokenizer=clip_tokenizer(),
                        alphas_cumprod=scaled_linear_alphas_cumprod(0.00085, 0.012, 1000),
                        scaling_factor=0.13025 if name == "sdxl" else 0.18215, dtype=dtype,
                        text_encoder_2=text_2, tokenizer_2=tokenizer_2)


def measure(sd: SDComponents, size: int, steps: int) -> dict[str, Any]:
    """One warm-up step, then ``steps`` timed steps of run_capture (per-step wall times) under a memory monitor."""
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    starts: list[float] = []
    ends: list[float] = []
    run_capture(sd, latent, PROMPT, max_steps=1)  # warm-up
    gc.collect()
    with MemoryMonitor("cpu") as mon:
        maps = run_capture(sd, latent, PROMPT, max_steps=steps, should_stop=lambda: starts.append(time.perf_counter()),
                           progress=lambda done, total: ends.append(time.perf_counter()))
    per_step = [e - s for s, e in zip(starts, ends)]
    reading = mon.reading
    return {"image_size": size, "latent": list(latent.shape[-2:]), "steps": len(per_step),
            "step_s": [round(t, 3) for t in per_step], "s_per_step": round(statistics.mean(per_step), 3),
            "layers_per_step": len(maps.layers) // max(1, len(per_step)),
            "map_grid": list(maps.cond.shape[1:3]), "maps_shape": list(maps.cond.shape),
            "unet_params": sum(p.numel() for p in sd.unet.parameters()),
            "rss_start_mb": round(reading.rss_start_mb, 1), "rss_peak_mb": round(reading.rss_peak_mb, 1),
            "rss_delta_mb": round(reading.rss_delta_mb, 1), "rss_method": reading.rss_method}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, choices=(1, 2), default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny models at S = 64 and 128 (CI smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    rows = {}
    sizes = {"sd2": 64, "sdxl": 128} if args.tiny else {"sd2": 512, "sdxl": 1024}
    for name, size in sizes.items():
        sd = build(name, dtype, args.tiny)
        rows[name] = measure(sd, size, args.steps)
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
        del sd
        gc.collect()
    def ratio(key: str) -> float | None:
        below = rows["sd2"][key]
        return round(rows["sdxl"][key] / below, 2) if below > 0 else None

    ratios = {"s_per_step_sdxl_over_sd2": ratio("s_per_step"), "rss_delta_sdxl_over_sd2": ratio("rss_delta_mb"),
              "rss_peak_sdxl_over_sd2": ratio("rss_peak_mb")}
    out = {"what": "capture stage (UNet steps, CFG batch 2, factor-4 cross-attention logits)",
           "dtype": args.dtype, "tiny": bool(args.tiny), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "models": {"sd2": "SD 2.1 base at S = 512",
                                                                          "sdxl": "SDXL base 1.0 at S = 1024"},
           "rows": rows, "ratios": ratios}
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
