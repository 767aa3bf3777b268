"""GPU check of refdiff: full Ref-Diff end to end in fp16 at S = 512 and 1024, with and without offload, on
full-size random-weight models; per-stage times, peak VRAM and NaN checks, as JSON and a Markdown table.

    python benchmarks/gpu_check.py --out gpu_check/          # on a CUDA machine, about 2-4 minutes
    python benchmarks/gpu_check.py --dry-run --out dry/      # the same code path on the CPU, tiny models

Without CUDA (and without --dry-run) it refuses to start with a one-line message and exit code 2; exit code 3 when
every run was skipped for the time budget (nothing checked), 1 when an output was not finite. The JSON is
rewritten after every run, so a run cut short still leaves the runs that finished. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from refdiff import offload as refdiff_offload
from refdiff.pipeline import RefDiff, Result, _LRU

from benchmarks.ratios import fixed_sam_proposals
from benchmarks.report import jsonable
from benchmarks.run import DTYPES, _device_name, _git_commit, _versions
from benchmarks.workload import FULL, SEED, SENTENCE, SHORT, ModeSettings, Models, build_models, synthetic_image, \
    synthetic_proposals

JSON_NAME = "gpu_check.json"
MARKDOWN_NAME = "gpu_check.md"
BUDGET_S = 480.0  # the whole check must fit 8 minutes on one H100/H200-class GPU
BUDGET_MARGIN = 1.5  # a run starts only if 1.5 x the longest run so far still fits in the budget
NO_CUDA_MESSAGE = ("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a CUDA "
                   "machine, or pass --dry-run for the CPU rehearsal with tiny models")
MB = 1024.0 * 1024.0


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {JSON_NAME} and {MARKDOWN_NAME}")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny models (refdiff.testing), small sizes; no CUDA call at all")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sizes S (default 512 1024; dry run: 64 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="SD and CLIP weights (default fp16)")
    parser.add_argument("--sam-dtype", choices=sorted(DTYPES), default="fp32",
                        help="SAM weights (default fp32, as load_sam and from_pretrained load SAM)")
    parser.add_argument("--sam-type", choices=("vit_b", "vit_l", "vit_h"), default="vit_h",
                        help="SAM model (default vit_h, the presets' choice; dry run: the tiny SAM)")
    parser.add_argument("--sam-points", type=int, default=None,
                        help="points_per_side of SAM's automatic masks (default the preset's 32; dry run 4)")
    parser.add_argument("--sam-batch", type=int, default=None,
                        help="points_per_batch (default the preset's 64; dry run 16)")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs per configuration, each on a fresh RefDiff (cold caches); the first includes "
                             "CUDA's lazy start-up (default 2)")
    parser.add_argument("--offload", choices=("both", "off", "on"), default="both",
                        help="configurations without offload, with offload=True, or both (default)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="skip the remaining runs when the next one might end after this many seconds "
                             f"(default {BUDGET_S:.0f})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


# --------------------------------------------------------------------------------------------- CUDA guards
def _cuda(device: torch.device) -> bool:
    """Whether CUDA calls are allowed: only for a CUDA device (never in a dry run)."""
    return device.type == "cuda"


def _synchronize(device: torch.device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)


def _reset_peaks(device: torch.device) -> float | None:
    """Free the allocator's cache, reset its peak counters; the allocated MB at the start (None off CUDA)."""
    if not _cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / MB


def _peaks(device: torch.device) -> dict[str, float | None]:
    """Peak allocated and reserved MB since the last reset (None off CUDA)."""
    if not _cuda(device):
        return {"max_memory_allocated_mb": None, "max_memory_reserved_mb": None}
    return {"max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / MB,
            "max_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / MB}


def _cuda_meta(device: torch.device) -> dict[str, Any]:
    if not _cuda(device):
        return {"cuda": None}
    props = torch.cuda.get_device_properties(device)
    return {"cuda": torch.version.cuda, "total_memory_mb": props.total_memory / MB,
            "capability": f"{props.major}.{props.minor}"}


# ------------------------------------------------------------------------------------------------ checks
def finite_report(result: Result) -> dict[str, bool]:
    """Per output: True when it holds no NaN or inf (the attention map and every score vector present)."""
    out = {}
    if result.attention is not None:
        out["attention"] = bool(np.isfinite(result.attention).all())
    for key, scores in result.scores.items():
        if scores is not None:
            out[f"scores.{key}"] = bool(np.isfinite(scores).all())
    return out


def cache_census(model: RefDiff) -> dict[str, Any]:
    """Entries, tensors and bytes held by RefDiff's per-image caches, and how many tensors sit off the CPU."""
    entries = tensors = nbytes = off_cpu = 0

    def walk(value: Any) -> None:
        nonlocal tensors, nbytes, off_cpu
        if isinstance(value, torch.Tensor):
            tensors += 1
            nbytes += value.numel() * value.element_size()
            off_cpu += value.device.type != "cpu"
        elif isinstance(value, np.ndarray):
            tensors += 1
            nbytes += int(value.nbytes)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))

    for cache in vars(model).values():
        if isinstance(cache, _LRU):
            entries += len(cache.data)
            walk(list(cache.data.values()))
    return {"entries": entries, "tensors": tensors, "mb": nbytes / MB, "tensors_off_cpu": off_cpu}


# ----------------------------------------------------------------------------------------------- the runs
def settings(args: argparse.Namespace) -> tuple[ModeSettings, tuple[int, ...]]:
    """The workload: full-size models at S = 512 and 1024, or the tiny ones of the short mode (dry run)."""
    mode = SHORT if args.dry_run else FULL
    points = args.sam_points if args.sam_points is not None else mode.sam_points
    batch = args.sam_batch if args.sam_batch is not None else mode.sam_points_per_batch
    if points < 1 or batch < 1:
        raise SystemExit("--sam-points and --sam-batch must be >= 1")
    mode = dataclasses.replace(mode, sam_types=(args.sam_type,), sam_type=args.sam_type, sam_points=points,
                               sam_points_per_batch=batch)
    sizes = tuple(args.sizes or mode.sizes)
    if any(s < 8 or s % 8 for s in sizes):
        raise SystemExit(f"--sizes must be positive multiples of 8, got {list(sizes)}")
    return mode, sizes


def place(models: Models, device: torch.device) -> None:
    """All models on ``device`` (after offloaded runs left them on the CPU)."""
    for part in (models.sd.unet, models.sd.vae, models.sd.text_encoder, models.clip, *models.sams.values()):
        refdiff_offload.move_to(part, device)


def one_run(models: Models, mode: ModeSettings, size: int, offload: bool, device: torch.device, rgb: np.ndarray,
            proposals: torch.Tensor, say: Callable[[str], None]) -> dict[str, Any]:
    """Ref-Diff ``full`` on a fresh RefDiff (cold caches): wall time, Result.timings, peak VRAM, checks."""
    sam = models.sams[mode.sam_type]
    kwargs: dict[str, Any] = {"offload": True, "device": device} if offload else {}
    model = RefDiff(sd=models.sd, sam=sam, clip=models.clip, preset=mode.preset(size),
                    progress=lambda stage: say(f"stage {stage}"), **kwargs)
    gc.collect()
    start_mb = _reset_peaks(device)
    encoder_calls: list[str] = []  # 2 calls: an fp16 encode overflowed and ran again in float32
    hook = models.sd.vae.encoder.register_forward_hook(lambda mod, args, out: encoder_calls.append(str(out.dtype)))
    try:
        with fixed_sam_proposals(proposals) as sam_calls:
            _synchronize(device)
            start = time.perf_counter()
            result = model(rgb, SENTENCE, variant="full", seed=SEED)
            _synchronize(device)
            wall = time.perf_counter() - start
    finally:
        hook.remove()
    checks = finite_report(result)
    record = {"wall_s": wall, "timings_s": dict(result.timings), "allocated_at_start_mb": start_mb, **_peaks(device),
              "finite": checks, "all_finite": all(checks.values()), "index": result.index,
              "proposals": int(result.proposals.shape[0]), "sam_runs": len(sam_calls),
              "sam_masks_raw": sam_calls[0] if sam_calls else None, "vae_encoder_outputs": encoder_calls,
              "caches": cache_census(model),
              "mask_dtype": str(result.mask.dtype), "attention_dtype": str(result.attention.dtype)}
    del model, result
    return record


def configurations(sizes: Sequence[int], offload: str) -> list[tuple[int, bool]]:
    """(S, offload) in run order: every S without offload first, then with (models move to the CPU once)."""
    flags = {"both": (False, True), "off": (False,), "on": (True,)}[offload]
    return [(s, flag) for flag in flags for s in sizes]


# ------------------------------------------------------------------------------------------------ output
def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """One table row per run: S, offload, wall time, each stage's time, peak VRAM, finite checks."""
    meta, runs = results["meta"], results["runs"]
    stages: list[str] = []
    for r in runs:
        stages += [k for k in r["timings_s"] if k not in stages]
    lines = [f"## GPU check: {meta['device_name']}, {meta['dtype']} SD/CLIP, SAM {meta['sam_type']} "
             f"{meta['sam_dtype']}{' (dry run: CPU, tiny models)' if meta['dry_run'] else ''}", "",
             f"Ref-Diff `full`, preset `official` at S, SAM {meta['sam_points']} x {meta['sam_points']} points in "
             f"batches of {meta['sam_batch']}; image {meta['image_hw'][1]} x {meta['image_hw'][0]}, \"{SENTENCE}\"; "
             f"each run on a fresh RefDiff; torch {meta['torch']}; {len(runs)} run(s) in "
             f"{meta['elapsed_s']:.0f} s.", "",
             "| S | offload | run | wall (s) | " + " | ".join(stages) +
             " | peak allocated (MB) | peak reserved (MB) | finite | cached tensors off CPU |",
             "|---" * (8 + len(stages)) + "|"]
    for r in runs:
        cells = [str(r["size"]), "yes" if r["offload"] else "no", str(r["run"]), _f(r["wall_s"])]
        cells += [_f(r["timings_s"].get(k), 3) for k in stages]
        cells += [_f(r["max_memory_allocated_mb"], 0), _f(r["max_memory_reserved_mb"], 0),
                  "yes" if r["all_finite"] else "NO: " + ", ".join(k for k, ok in r["finite"].items() if not ok),
                  str(r["caches"]["tensors_off_cpu"])]
        lines.append("| " + " | ".join(cells) + " |")
    if results["skipped"]:
        lines += ["", "Skipped to stay within the time budget: " + ", ".join(
            f"S={s['size']} offload={'yes' if s['offload'] else 'no'} run {s['run']}" for s in results["skipped"])]
    lines += ["", "Stage times: `Result.timings` (seconds; `sam` includes the image encoder and every point batch). "
              "Peak VRAM: torch.cuda.max_memory_allocated / max_memory_reserved, reset before each run."]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict[str, Any]) -> None:
    """Write the JSON (atomically) and the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable(results)
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / JSON_NAME)
    (out / MARKDOWN_NAME).write_text(markdown(data), encoding="utf-8")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, run every configuration, write the files after each run; return the results."""
    clock = time.perf_counter()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - clock:7.1f} s] {msg}", file=sys.stderr, flush=True)

    device = torch.device("cpu" if args.dry_run else "cuda")
    mode, sizes = settings(args)
    dtype, sam_dtype = DTYPES[args.dtype], DTYPES[args.sam_dtype]
    torch.manual_seed(SEED)
    say(f"{'dry run on the CPU (tiny models)' if args.dry_run else _device_name(device)}: building models "
        f"({args.dtype} SD/CLIP, SAM {args.sam_type} {args.sam_dtype})")
    models = build_models(mode, device, dtype)
    for sam in models.sams.values():
        sam.to(dtype=sam_dtype)
    h, w = mode.image_hw
    rgb, proposals = synthetic_image(h, w), synthetic_proposals(h, w, mode.proposals)
    results: dict[str, Any] = {
        "meta": {"dry_run": bool(args.dry_run), "device": str(device), "device_name": _device_name(device),
                 **_cuda_meta(device), "dtype": args.dtype, "sam_dtype": args.sam_dtype,
                 "sam_type": "tiny" if args.dry_run else args.sam_type, "sam_points": mode.sam_points,
                 "sam_batch": mode.sam_points_per_batch, "sizes": list(sizes), "runs_per_config": args.runs,
                 "image_hw": [h, w], "sentence": SENTENCE, "fixed_proposals": int(proposals.shape[0]),
                 "torch": torch.__version__, "python": platform.python_version(), "versions": _versions(),
                 "git_commit": _git_commit(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
                 "budget_s": args.budget_s, "model_build_s": models.build_s, "models": models.description,
                 "elapsed_s": time.perf_counter() - clock},
        "runs": [], "skipped": []}
    write(args.out, results)
    say(f"models built in {sum(models.build_s.values()):.1f} s; writing {args.out / JSON_NAME} after every run")
    longest = 0.0
    for size, offload in configurations(sizes, args.offload):
        if not offload:
            place(models, device)
        for i in range(1, args.runs + 1):
            elapsed = time.perf_counter() - clock
            if elapsed + BUDGET_MARGIN * longest > args.budget_s:
                say(f"S={size} offload={offload} run {i}: skipped, it might end after the {args.budget_s:.0f} s budget")
                results["skipped"].append({"size": size, "offload": offload, "run": i})
                continue
            label = f"S={size} offload={'on' if offload else 'off'} run {i}/{args.runs}"
            say(f"{label}: start")
            record = one_run(models, mode, size, offload, device, rgb, proposals, lambda m: say(f"{label}: {m}"))
            longest = max(longest, record["wall_s"])
            results["runs"].append({"size": size, "offload": offload, "run": i, **record})
            results["meta"]["elapsed_s"] = time.perf_counter() - clock
            write(args.out, results)
            peak = record["max_memory_allocated_mb"]
            say(f"{label}: {record['wall_s']:.2f} s, peak allocated {_f(peak, 0)} MB, "
                f"finite {'yes' if record['all_finite'] else 'NO'}")
    results["meta"]["elapsed_s"] = time.perf_counter() - clock
    write(args.out, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, refuse without CUDA (exit 2) unless --dry-run, run, print the table."""
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    results = run(args)
    print(markdown(jsonable(results)))
    return exit_code(results)


def exit_code(results: dict[str, Any]) -> int:
    """0 when at least one run finished and every run's outputs were finite; 1 when some output was not finite;
    3 when no run finished (every one skipped for the budget): a check that ran nothing has checked nothing."""
    runs = results["runs"]
    if not runs:
        print("gpu_check: no run finished (every run was skipped to stay within --budget-s); nothing was checked",
              file=sys.stderr)
        return 3
    return 0 if all(r["all_finite"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
