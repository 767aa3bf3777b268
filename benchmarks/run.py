"""Benchmark of refdiff: per-stage wall time and peak memory, and ratios that carry across machines.

    python benchmarks/run.py [--mode short|full] [--device cpu|cuda] [--sizes 512 1024] [--repeats N]
                             [--out results.json] [--markdown table.md]

Full mode uses full-size random-weight models (SD 1.5, SAM vit_b and vit_h, CLIP ViT-B/16); short mode tiny
ones at tiny sizes (a smoke test that every stage and ratio runs). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from refdiff.text import parse_text

from benchmarks import ratios as R
from benchmarks.harness import Timer
from benchmarks.memory import MemoryMonitor, lifetime_peak_rss_mb
from benchmarks.report import CAPTURE_TARGET, OVERHEAD_TARGET, jsonable, markdown
from benchmarks.stages import run_stages, stage_infos
from benchmarks.workload import (MODES, SEED, SENTENCE, ModeSettings, build_models, synthetic_image,
                                 synthetic_proposals)

RATIOS = ("overhead", "capture", "clip", "sentences", "sam", "amg", "speed")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full",
                        help="full: full-size random-weight models; short: tiny models and sizes (CI smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="SD and CLIP weights (SAM stays fp32); default fp32 on cpu, fp16 on cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sizes S (default: 512 1024 in full mode, 64 128 in short mode)")
    parser.add_argument("--repeats", type=int, default=None, help="measured runs per stage (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per stage, excluded (default 1)")
    parser.add_argument("--slow-repeats", type=int, default=None,
                        help="measured runs of the slow measurements: SAM rows, end-to-end runs, (d), (e) "
                             "(default: --repeats)")
    parser.add_argument("--slow-warmup", type=int, default=None,
                        help="warm-up runs of the slow measurements (default: --warmup)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice, recorded in the output)")
    parser.add_argument("--ratios", nargs="+", choices=RATIOS, default=list(RATIOS),
                        help="which ratios to measure (default: all)")
    parser.add_argument("--sam-types", nargs="+", choices=("vit_b", "vit_l", "vit_h"), default=None,
                        help="SAM rows of the stage table (default: vit_b vit_h)")
    parser.add_argument("--pipeline-sam", choices=("vit_b", "vit_l", "vit_h"), default=None,
                        help="SAM of the end-to-end runs and of ratio (e) (default: vit_h, the presets' choice); "
                             "must be one of --sam-types")
    parser.add_argument("--sentence-size", type=int, default=None,
                        help="S of the K-sentences ratio (default: the largest of --sizes in full mode, the "
                             "smallest in short mode)")
    parser.add_argument("--rss-interval-ms", type=float, default=2.0, help="VmRSS sampling interval")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("diffusers", "transformers", "open_clip_torch", "segment_anything", "spacy", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


@dataclasses.dataclass
class Options:
    """The resolved settings of one benchmark run."""

    mode: ModeSettings
    device: torch.device
    dtype: torch.dtype
    sizes: tuple[int, ...]
    repeats: int
    warmup: int
    ratios: set[str]
    sentence_size: int
    slow_repeats: int
    slow_warmup: int


def resolve(args: argparse.Namespace) -> Options:
    """Check the arguments and fill in the mode's defaults."""
    mode = MODES[args.mode]
    sam_types = tuple(dict.fromkeys(args.sam_types or mode.sam_types))
    pipeline_sam = args.pipeline_sam or (mode.sam_type if mode.sam_type in sam_types else sam_types[-1])
    if pipeline_sam not in sam_types:
        raise SystemExit(f"--pipeline-sam {pipeline_sam} must be one of --sam-types {list(sam_types)}")
    mode = dataclasses.replace(mode, sam_types=sam_types, sam_type=pipeline_sam)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    sizes = tuple(args.sizes or mode.sizes)
    if any(s < 8 or s % 8 for s in sizes):
        raise SystemExit(f"--sizes must be positive multiples of 8, got {list(sizes)}")
    repeats = mode.repeats if args.repeats is None else args.repeats
    warmup = mode.warmup if args.warmup is None else args.warmup
    slow_repeats = repeats if args.slow_repeats is None else args.slow_repeats
    slow_warmup = warmup if args.slow_warmup is None else args.slow_warmup
    if repeats < 1 or warmup < 0 or slow_repeats < 1 or slow_warmup < 0:
        raise SystemExit("--repeats and --slow-repeats must be >= 1, --warmup and --slow-warmup >= 0")
    sentence_size = args.sentence_size or (max(sizes) if args.mode == "full" else min(sizes))
    return Options(mode=mode, device=device, dtype=DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")],
                   sizes=sizes, repeats=repeats, warmup=warmup, ratios=set(args.ratios), sentence_size=sentence_size,
                   slow_repeats=slow_repeats, slow_warmup=slow_warmup)


def stage_rows(opts: Options, once: dict[str, Any], per_size: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage table's rows: S-independent measurements repeated under every S."""
    rows = []
    for info in stage_infos(opts.mode.sam_types):
        by_size = {s: (per_size[s][info.key] if info.per_size else once[info.key]) for s in opts.sizes}
        rows.append({"key": info.key, "label": info.label, "per_size": info.per_size, "by_size": by_size})
    return rows


def measure_ratios(opts: Options, timer: Timer, models: Any, shared: Any, inputs: dict[int, Any],
                   once: dict[str, Any], per_size: dict[int, dict[str, Any]], log: Any) -> dict[str, Any]:
    """Ratios (a)-(e) as asked for with --ratios."""
    mode, wanted, ratios = opts.mode, opts.ratios, {}
    captures: dict[int, dict[str, Any]] = {}
    if wanted & {"capture", "overhead"}:
        for s in opts.sizes:
            log(f"(b) capture cost at S = {s}")
            captures[s] = R.capture_cost(timer, models, shared, inputs[s], log)
        if "capture" in wanted:
            ratios["capture"] = {s: {**c, "target": CAPTURE_TARGET} for s, c in captures.items()}
    if "overhead" in wanted:
        log("(a) CLIP forwards without preprocessing")
        clip_fw = R.clip_forwards(timer, models, mode, shared)
        ratios["overhead"] = {}
        for s in opts.sizes:
            log(f"(a) end to end at S = {s}")
            ratios["overhead"][s] = {**R.overhead(timer, models, mode, shared, inputs[s], once, per_size[s],
                                                  captures[s]["plain"], captures[s]["steps"], clip_fw),
                                     "target": OVERHEAD_TARGET}
        ratios["clip_forwards"] = clip_fw
    if "clip" in wanted:
        log("(c) CLIP scaling with N")
        c = R.clip_scaling(timer, models, mode, shared)
        ratios["clip_scaling"] = {"base": c["base"], "rows": {
            n: {**c["rows"][n], "crop_ratio": c["ratios"][n]["crop"], "masked_ratio": c["ratios"][n]["masked"]}
            for n in mode.clip_counts}}
    if "sentences" in wanted:
        size = opts.sentence_size
        log(f"(d) K sentences at S = {size}")
        cold = ratios.get("overhead", {}).get(size, {}).get("end_to_end")
        ratios["sentences"] = R.sentences_reuse(timer, models, mode, shared, size, cold=cold)
    if "sam" in wanted:
        log("(e) SAM settings")
        ratios["sam_settings"] = R.sam_settings(timer, models, mode, shared)
    if "amg" in wanted:
        log("(f) one AMG batch: segment_anything vs refdiff.amg")
        ratios["amg_batch"] = R.amg_batch(timer, models, mode, shared)
    if "speed" in wanted:
        size = min(opts.sizes)
        log(f"(g) speed options of the UNet stage at S = {size}")
        ratios["speed_options"] = R.speed_options(timer, models, mode, shared, inputs[size])
    return ratios


def describe(opts: Options, args: argparse.Namespace, models: Any, shared: Any, started: str) -> dict[str, Any]:
    """The environment and settings of the run (the JSON's "meta")."""
    h, w = opts.mode.image_hw
    return {
        "mode": args.mode, "device": str(opts.device), "device_name": _device_name(opts.device),
        "dtype": str(opts.dtype), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")},
        "python": platform.python_version(), "platform": platform.platform(), "versions": _versions(),
        "git_commit": _git_commit(), "started": started, "sizes": list(opts.sizes), "repeats": opts.repeats,
        "warmup": opts.warmup, "slow_repeats": opts.slow_repeats, "slow_warmup": opts.slow_warmup,
        "image_hw": [h, w], "sentence": SENTENCE, "proposals": int(shared.proposals.shape[0]),
        "seed": SEED, "sam_type_pipeline": opts.mode.sam_type, "sam_counts_stage": shared.sam_counts,
        "models": models.description, "model_build_s": models.build_s, "rss_interval_ms": args.rss_interval_ms,
        "process_peak_rss_mb": max(lifetime_peak_rss_mb(), MemoryMonitor.process_peak_mb),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed arguments; return the JSON-ready results."""
    clock = time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    opts = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (
        lambda msg: print(f"[{time.perf_counter() - clock:7.1f} s] {msg}", file=sys.stderr, flush=True))
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    log(f"{args.mode} mode on {opts.device} ({opts.dtype}), sizes {list(opts.sizes)}, {opts.repeats} repeat(s) + "
        f"{opts.warmup} warm-up, {torch.get_num_threads()} torch thread(s); building models")
    models = build_models(opts.mode, opts.device, opts.dtype)
    h, w = opts.mode.image_hw
    rgb, proposals = synthetic_image(h, w), synthetic_proposals(h, w, opts.mode.proposals)
    parse_text(SENTENCE)  # load spaCy's pipeline now, not inside the first measurement
    gc.collect()
    gc.freeze()  # models and libraries move to the permanent generation: per-run gc.collect() stays cheap
    timer = Timer(device=opts.device, repeats=opts.repeats, warmup=opts.warmup,
                  rss_interval_s=args.rss_interval_ms / 1000.0, log=log, slow_repeats=opts.slow_repeats,
                  slow_warmup=opts.slow_warmup)
    once, per_size, shared, inputs = run_stages(timer, models, opts.mode, opts.sizes, rgb, SENTENCE, proposals, log)
    rows = stage_rows(opts, once, per_size)
    ratios = measure_ratios(opts, timer, models, shared, inputs, once, per_size, log)
    meta = describe(opts, args, models, shared, started)
    meta["wall_s"] = time.perf_counter() - clock
    totals = {s: sum(r["by_size"][s].median for r in rows) for s in opts.sizes}
    return jsonable({"meta": meta, "stages": {"sizes": list(opts.sizes), "rows": rows, "total_s": totals},
                     "ratios": ratios})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the Markdown tables, write JSON/Markdown files when asked."""
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    finally:
        gc.unfreeze()
    text = markdown(results)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
