"""Cost of the Flux joint-attention capture (nodes/dit_backend.py) against the plain forward, in one run, through
ComfyUI's own Flux classes and sampling path:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/dit_capture.py [--mode short|full] [--size 512]
        [--double 2] [--single 1] [--hidden 3072] [--threads N] [--repeats 3] [--out dit.json]

The same flow evaluation (one step at t = 0.25, the section 15 default) runs three ways on one MODEL: plain (a
clone without patches), map kind ``attention`` and map kind ``concept`` (6 concepts), every double block of the
slice recorded. Full-size Flux.1 (12 B parameters, 19 double + 38 single blocks, 48 GB in fp32) does not fit this
benchmark's memory, so full mode measures a slice of its blocks at full width (hidden 3072, 24 heads of 128,
T5 context 4096 x 256 tokens, CLIP vector 768); short mode is a smoke run on a width-reduced model (hidden 128).
Random weights: the time of a network does not depend on them. Times are medians of interleaved rounds (plain, attention, concept, then again); memory is the peak RSS
above the run's start (benchmarks/memory.py).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "refdiff_bench_pack"


def comfy_on_path() -> None:
    """ComfyUI's folder on sys.path (COMFYUI_PATH), CPU mode set before its model management loads."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not Path(comfy, "comfy").is_dir():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI folder (this benchmark runs ComfyUI's Flux classes)")
    sys.path.insert(0, comfy)
    sys.path.insert(0, str(ROOT))
    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        from comfy.cli_args import args
    finally:
        sys.argv = saved
    args.cpu = not torch.cuda.is_available()


def pack_module(name: str):
    """nodes/<name>.py imported as part of the pack (its folder is not a package on the path)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "nodes" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "nodes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")


def flux_model(hidden: int, double: int, single: int, dtype: torch.dtype, seed: int = 0):
    """A Flux (dev: guidance embedding) MODEL of ComfyUI's own classes, Flux.1's shapes except the width and the
    block counts given, N(0, 0.02) weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    heads = hidden // 128
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
           "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
           "depth": double, "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000,
           "patch_size": 2, "qkv_bias": True}
    config = sm.Flux(cfg)
    config.set_inference_dtype(dtype, None)
    base = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02 if p.ndim > 1 else torch.ones(p.shape)).to(p.dtype))
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    device = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu")), params


def extra_flops(hidden: int, img: int, txt: int, concepts: int, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Multiply-adds x 2 of one Flux double block and of what each map kind adds to it (analytic, no timing):
    ``attention``: the image queries' scores on all joint keys again (the model's fused attention does not
    return its probabilities); ``concept``: the concept tokens through the text stream's weights, their
    attention on [concepts; image] and the output-space products."""
    length, d = img + txt, hidden
    linear = 2 * length * (3 * d * d + d * d + 2 * mlp_ratio * d * d)  # qkv, proj, MLP of both streams
    attention = 2 * 2 * length * length * d  # scores and weighted values
    block = linear + attention
    att = 2 * img * length * d
    con = (2 * concepts * (3 * d * d + d * d + 2 * mlp_ratio * d * d) + 2 * 2 * concepts * (concepts + img) * d
           + 2 * img * concepts * d)
    return {"block_gflop": round(block / 1e9, 2), "attention_extra": round(att / block, 5),
            "concept_extra": round(con / block, 5)}


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["short", "full"], default="full")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (full 512, short 64)")
    parser.add_argument("--double", type=int, default=2, help="double blocks of the slice")
    parser.add_argument("--single", type=int, default=1, help="single blocks of the slice")
    parser.add_argument("--hidden", type=int, default=None, help="width, a multiple of 128 (full 3072, short 128)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    comfy_on_path()
    from benchmarks.memory import MemoryMonitor
    from benchmarks.report import emit

    import comfy.sample
    import comfy.samplers

    dit = pack_module("dit_backend")
    from refdiff.flow import DEFAULT_FLOW_T, flow_ts
    from refdiff.stores import AttentionStore

    hidden = a.hidden or (3072 if a.mode == "full" else 128)
    size = a.size or (512 if a.mode == "full" else 64)
    model, params = flux_model(hidden, a.double, a.single, torch.float32)
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, size // 8, size // 8, generator=gen)
    noise = torch.randn(latent.shape, generator=gen)
    cond = [[torch.randn(1, 256, 4096, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen),
                                                         "guidance": 3.5}]]
    concepts = torch.randn(1, 6, 4096, generator=gen)
    positions = [[1, 2], [5], [], [], [], []]
    ts = flow_ts(DEFAULT_FLOW_T, 1)
    blocks = list(range(a.double))

    def plain() -> None:
        clone = model.clone()
        sampler = comfy.samplers.KSAMPLER(dit._flow_sampler(ts, AttentionStore(kind="probs"), lambda: None))
        comfy.sample.sample_custom(clone, noise, 1.0, sampler, torch.tensor(ts + [0.0]), cond, cond, latent,
                                   disable_pbar=True, seed=0)

    def capture(kind: str):
        return lambda: dit.run_joint_capture(model, latent, noise, ts, cond, None, 1.0, False, kind, blocks,
                                             concepts, positions)

    runs = {"plain": plain, "attention": capture("attention"), "concept": capture("concept")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    rows = {}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(a.repeats):  # interleaved rounds: a load change on the machine hits every variant alike
            for name, fn in runs.items():
                times[name].append(timed(fn))
        for name, fn in runs.items():
            with MemoryMonitor("cpu") as mon:
                fn()
            rows[name] = {"median_s": round(statistics.median(times[name]), 4), "min_s": round(min(times[name]), 4),
                          "times_s": [round(t, 4) for t in times[name]],
                          "rss_delta_mb": round(mon.reading.rss_delta_mb, 1)}
    for name in ("attention", "concept"):
        rows[name]["ratio_to_plain"] = round(rows[name]["median_s"] / rows["plain"]["median_s"], 4)
        rows[name]["extra_mb_vs_plain"] = round(rows[name]["rss_delta_mb"] - rows["plain"]["rss_delta_mb"], 1)
    # The measured extra per recorded block of the slice (no extrapolation to the whole Flux.1: the slice's width
    # and block count are the run's, and a per-block difference of a few per cent is within the CPU's noise).
    for name in ("attention", "concept"):
        rows[name]["extra_s_per_block"] = round((rows[name]["median_s"] - rows["plain"]["median_s"]) / len(blocks), 4)
    grid = size // 16
    flops = extra_flops(hidden, grid * grid, 256, concepts.shape[1])
    out = {"mode": a.mode, "size_px": size, "image_tokens": grid * grid, "text_tokens": 256, "hidden": hidden,
           "heads": hidden // 128, "double_blocks": a.double, "single_blocks": a.single, "recorded_blocks": blocks,
           "params": params, "dtype": "fp32", "flow_ts": ts, "concepts": 6, "threads": torch.get_num_threads(),
           "device": "cuda" if torch.cuda.is_available() else "cpu", "repeats": a.repeats, "rows": rows,
           "flops_per_double_block": flops}
    emit(out, a.out)
    return out


if __name__ == "__main__":
    main()
