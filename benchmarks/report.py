"""Results as a JSON-ready dict and as Markdown tables."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .harness import Measurement

OVERHEAD_TARGET = 1.05  # (a) end to end / unavoidable forwards
CAPTURE_TARGET = 1.10  # (b) UNet step with capture / without


def jsonable(value: Any) -> Any:
    """Measurements -> dicts, tuples -> lists, dict keys -> str, NaN/inf -> None (strict JSON)."""
    if isinstance(value, Measurement):
        return jsonable(value.to_dict())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def emit(result: dict[str, Any], out: str | Path | None) -> None:
    """Print a benchmark's result as JSON and, when ``out`` is given, write it there too (folders created)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def _f(value: float | None, digits: int = 3) -> str:
    """A number for a table cell ("n/a" when unknown)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.0f}"


def _ok(value: float, target: float) -> str:
    return "yes" if math.isfinite(value) and value <= target else "no"


def stage_table(results: dict[str, Any], cuda: bool) -> list[str]:
    """The per-stage table: median time and peak memory per S."""
    sizes = results["stages"]["sizes"]
    head = ["stage"]
    for s in sizes:
        head += [f"S={s} time (s)", f"S={s} peak ΔRSS (MB)"] + ([f"S={s} peak ΔVRAM (MB)"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["stages"]["rows"]:
        label = row["label"] + ("" if row["per_size"] else " \\*")
        cells = [label]
        for s in sizes:
            m = row["by_size"][str(s)]
            cells += [_f(m["median_s"], 4), _mb(m["rss_delta_mb"])]
            if cuda:
                cells.append(_mb(m.get("vram_delta_mb")))
        lines.append("| " + " | ".join(cells) + " |")
    total = ["**total (sum of stages)**"]
    for s in sizes:
        total += [f"**{_f(results['stages']['total_s'][str(s)], 3)}**", ""] + ([""] if cuda else [])
    lines.append("| " + " | ".join(total) + " |")
    lines.append("")
    lines.append("\\* independent of S: measured once, shown in every column. Peak ΔRSS: the stage's peak resident "
                 "set size minus its starting RSS (see Method).")
    return lines


def ratio_tables(results: dict[str, Any], cuda: bool) -> list[str]:
    """Tables (a)-(g)."""
    r = results["ratios"]
    mem = "VRAM" if cuda else "RSS"
    key = "vram_delta_mb" if cuda else "rss_delta_mb"
    out: list[str] = []
    if "overhead" in r:
        out += ["### (a) Overhead: RefDiff end to end (cold caches) / unavoidable model forwards", "",
                "| S | end to end (s) | forwards measured alone (s) | ratio | met | forwards inside the same runs (s) "
                "| ratio | met | target |", "|---|---|---|---|---|---|---|---|---|"]
        for s, row in r["overhead"].items():
            out.append(f"| {s} | {_f(row['end_to_end']['median_s'])} | {_f(row['forwards_total_s'])} | "
                       f"{_f(row['ratio'])} | {_ok(row['ratio'], OVERHEAD_TARGET)} | "
                       f"{_f(row['in_run_forwards_total_s'])} | {_f(row['in_run_ratio'])} | "
                       f"{_ok(row['in_run_ratio'], OVERHEAD_TARGET)} | <= {OVERHEAD_TARGET} |")
        out.append("")
    if "capture" in r:
        out += ["### (b) Capture cost: one UNet call (CFG batch) with / without capture; peak memory vs naive", "",
                f"| S | without (s) | with (s) | ratio | target | met | naive (s) | peak Δ{mem} without (MB) | "
                f"peak Δ{mem} ours (MB) | peak Δ{mem} naive (MB) | naive / ours |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, row in r["capture"].items():
            naive = row.get("naive")
            naive_t = _f(naive["median_s"]) if naive else "skipped"
            naive_m = _mb(naive[key]) if naive else f"skipped (≥ {row['naive_estimate_mb'] / 1024:,.1f} GiB)"
            ours = row["capture"][key]
            rel = "n/a" if not naive or naive[key] is None else (
                _f(naive[key] / ours, 2) if ours is not None and ours >= 1 else "n/a (ours < 1 MB)")
            out.append(f"| {s} | {_f(row['plain']['median_s'])} | {_f(row['capture']['median_s'])} | "
                       f"{_f(row['time_ratio'])} | <= {CAPTURE_TARGET} | {_ok(row['time_ratio'], CAPTURE_TARGET)} | "
                       f"{naive_t} | {_mb(row['plain'][key])} | {_mb(ours)} | {naive_m} | {rel} |")
        out.append("")
    if "clip_scaling" in r:
        out += ["### (c) CLIP scoring of N proposals relative to N = 1", "",
                "| N | crop branch (s) | crop ratio | masked branch (s) | masked ratio | sub-linear (ratio < N) |",
                "|---|---|---|---|---|---|"]
        for n, row in r["clip_scaling"]["rows"].items():
            sub = "—" if int(n) == 1 else ("yes" if max(row["crop_ratio"], row["masked_ratio"]) < int(n) else "no")
            out.append(f"| {n} | {_f(row['crop']['median_s'], 4)} | {_f(row['crop_ratio'], 2)} | "
                       f"{_f(row['masked']['median_s'], 4)} | {_f(row['masked_ratio'], 2)} | {sub} |")
        out.append("")
    if "sentences" in r:
        d = r["sentences"]
        cold = d["cold"]
        out += [f"### (d) K sentences on one image (S = {d['size']}): one RefDiff / K cold runs", "",
                f"One cold run (one sentence on a fresh RefDiff): {_f(cold['median_s'])} s. Each sentence after "
                f"the first on the same RefDiff: " + ", ".join(_f(t) for t in d["per_sentence_s"][1:]) + " s.", "",
                "| K | one RefDiff, first K sentences (s) | K cold runs (s) | ratio | SAM runs per one-RefDiff run |",
                "|---|---|---|---|---|"]
        for k, row in d["rows"].items():
            out.append(f"| {k} | {_f(row['together_s'])} | {_f(row['cold_sum_s'])} | {_f(row['ratio'])} | "
                       f"{row['sam_runs']:g} |")
        out.append("")
    if "sam_settings" in r:
        e = r["sam_settings"]
        out += [f"### (e) SAM automatic masks ({e['sam_type']}) at the preset's settings vs faster ones", "",
                "| settings | time (s) | ratio to preset | proposals (raw) | proposals (after post-filter) |",
                "|---|---|---|---|---|"]
        for row in e["rows"]:
            out.append(f"| {row['label']} | {_f(row['measurement']['median_s'])} | {_f(row['ratio'])} | "
                       f"{row['raw']} | {row['kept']} |")
        out.append("")
    if "amg_batch" in r:
        f = r["amg_batch"]
        out += [f"### (f) One AMG batch ({f['sam_type']}, {f['points']} points = {f['candidates']} candidates): "
                f"segment_anything's generator vs refdiff.amg (chunks of {f['chunk_mb']} MB)", "",
                f"| image | filter | segment_anything (s) | refdiff.amg (s) | time ratio | peak Δ{mem} "
                f"segment_anything (MB) | peak Δ{mem} refdiff.amg (MB) | memory ratio | masks kept (both) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for row in f["rows"]:
            a, b = row["stock"][key], row["ours"][key]
            rel = _f(b / a, 3) if a and b is not None and a >= 1 else "n/a"
            kept = str(row["kept_ours"]) if row["kept_ours"] == row["kept_stock"] else (
                f"{row['kept_stock']} vs {row['kept_ours']}")
            out.append(f"| {row['image']} | {row['filter']} | {_f(row['stock']['median_s'])} | "
                       f"{_f(row['ours']['median_s'])} | {_f(row['time_ratio'])} | {_mb(a)} | {_mb(b)} | {rel} | "
                       f"{kept} |")
        out.append("")
    if "speed_options" in r:
        g = r["speed_options"]
        out += [f"### (g) Speed options of the UNet stage (S = {g['size']}): steps with capture", "",
                "| settings | time (s) | ratio to preset |", "|---|---|---|"]
        for row in g["rows"]:
            out.append(f"| {row['label']} | {_f(row['measurement']['median_s'])} | {_f(row['ratio'])} |")
        out.append("")
    return out


def markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown (meta line, stage table, ratio tables)."""
    meta = results["meta"]
    cuda = meta["device"].startswith("cuda")
    lines = [f"## Results: {meta['mode']} mode, {meta['device_name']}, {meta['dtype']}, "
             f"{meta['torch_threads']} torch thread(s)", "",
             f"Image {meta['image_hw'][1]} x {meta['image_hw'][0]} px, sentence \"{meta['sentence']}\", "
             f"{meta['proposals']} proposals downstream of SAM, median of {meta['repeats']} run(s) after "
             f"{meta['warmup']} warm-up run(s) ({meta.get('slow_repeats', meta['repeats'])} after "
             f"{meta.get('slow_warmup', meta['warmup'])} for SAM and end-to-end runs); torch {meta['torch']}; process peak RSS "
             f"{_mb(meta.get('process_peak_rss_mb'))} MB; run took {_f(meta.get('wall_s'), 0)} s.", "",
             "### Stages", ""]
    lines += stage_table(results, cuda)
    lines += ["", "## Ratios", ""] + ratio_tables(results, cuda)
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["jsonable", "markdown", "stage_table", "ratio_tables", "OVERHEAD_TARGET", "CAPTURE_TARGET"]
