"""Summaries of a results folder and the tables: ours beside the paper's figures (Ni et al., arXiv 2308.16777)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .metrics import PR_THRESHOLDS, pr_key, summarize_ious
from .records import jsonable, read_manifest, read_records, result_files

# rows in the order of the paper's tables, with the names it prints
VARIANT_ORDER = ("sam-clip", "G", "GS", "DS", "full", "prompted", "G-refine", "cluster")
DISPLAY_NAMES = {"sam-clip": "SAM-CLIP", "G": "Ref-Diff/G", "GS": "Ref-Diff/GS", "DS": "Ref-Diff/DS",
                 "full": "Ref-Diff", "prompted": "Ref-Diff, prompted SAM", "G-refine": "G + self-attention refine", "cluster": "feature clusters"}
# the spatial terms of the "<variant>+<term>" rows (refdiff.config.spatial_rows), as the tables print them
SPATIAL_TERM_NAMES = {"position": "position (left, top)", "middle": "middle", "ordinals": "ordinals (second from "
                      "the left)", "size": "size (biggest)", "relations": "relations (next to X)",
                      "negatives": "negatives (other nouns)", "spatial": "all spatial terms"}
DATASET_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "phrasecut": "PhraseCut"}
SPLIT_ORDER = ("val", "testA", "testB", "test", "miniv", "train")
# (dataset, split_by, split, variant) -> (mIoU, oIoU) in percent, as printed in the paper
PAPER_FIGURES: dict[tuple[str, str, str, str], tuple[float, float]] = {
    ("refcoco", "unc", "val", "full"): (37.21, 35.16),
    ("refcoco+", "unc", "val", "full"): (37.29, 35.56),
    ("refcocog", "umd", "val", "full"): (44.02, 38.62),
    ("refcoco", "unc", "val", "G"): (21.53, 16.18),
    ("refcoco", "unc", "val", "GS"): (29.82, 26.04),
    ("refcoco", "unc", "val", "DS"): (35.27, 33.64),
    ("refcoco", "unc", "val", "sam-clip"): (26.33, 25.23),
}


def paper_figures(dataset: str, split_by: str | None, split: str, variant: str) -> dict[str, float] | None:
    """The paper's mIoU / oIoU for a (dataset, split, variant), or None when it prints none."""
    fig = PAPER_FIGURES.get((dataset, split_by or "", split, variant))
    return None if fig is None else {"mIoU": fig[0], "oIoU": fig[1]}


def display_name(name: str) -> str:
    """The name a table prints for a variant: the paper's for its rows, "Ref-Diff + ordinals (second from the
    left)" for a row with spatial terms ("full+ordinals"), the name itself otherwise."""
    base, *terms = str(name).split("+")
    if terms and all(t in SPATIAL_TERM_NAMES for t in terms):
        return " + ".join([DISPLAY_NAMES.get(base, base), *(SPATIAL_TERM_NAMES[t] for t in terms)])
    return DISPLAY_NAMES.get(name, name)


def _order_key(name: str) -> tuple[int, int, str]:
    """Rows of the paper's variants first, in its order; a spatial row after its base variant, in the order of
    SPATIAL_TERM_NAMES (all terms last); any other name after them, alphabetically."""
    base, *terms = str(name).split("+")
    if base in VARIANT_ORDER and all(t in SPATIAL_TERM_NAMES for t in terms):
        return VARIANT_ORDER.index(base), max((list(SPATIAL_TERM_NAMES).index(t) + 1 for t in terms), default=0), name
    return len(VARIANT_ORDER), 0, name


def _ordered(variants: Sequence[str]) -> list[str]:
    return sorted(variants, key=_order_key)


def summarize_records(records: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Per-variant metrics, error counts and what is still missing, from deduplicated records."""
    names = list(manifest.get("variants") or [])
    names += [str(r.get("variant")) for r in records if str(r.get("variant")) not in names]
    expected = manifest.get("n_sentences")
    out: dict[str, Any] = {k: manifest.get(k) for k in ("dataset", "split", "split_by", "text", "preset",
                                                         "overrides", "seed", "limit", "sd", "sd_config", "sam",
                                                         "clip", "dtype")}
    out["n_sentences"] = expected
    out["pr_thresholds"] = list(PR_THRESHOLDS)
    out["variants"] = {}
    for name in _ordered(list(dict.fromkeys(names))):
        rows = [r for r in records if r.get("variant") == name]
        ok = [r for r in rows if "error" not in r]
        errs = [r for r in rows if "error" in r]
        summary = summarize_ious([r["iou"] for r in ok], [r["inter"] for r in ok], [r["union"] for r in ok])
        summary["errors"] = len(errs)
        summary["errors_by_kind"] = dict(sorted(Counter(str(r.get("error_kind")) for r in errs).items()))
        summary["missing"] = None if expected is None else max(int(expected) - len(ok) - len(errs), 0)
        secs = [r["seconds"] for r in ok if r.get("seconds") is not None]
        summary["seconds_per_sentence"] = float(np.mean(secs)) if secs else None
        summary["paper"] = paper_figures(str(out["dataset"]), out["split_by"], str(out["split"]), name)
        out["variants"][name] = summary
    return out


def summarize_folder(out_dir: str | Path) -> dict[str, Any]:
    """Summary of every result file of a results folder (shards merged, duplicates removed)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise InputError(f"{out_dir} is not a results folder (no run.json); pass the -o folder of `refdiff eval`")
    files = result_files(out_dir)
    summary = summarize_records(list(read_records(files).values()), manifest)
    summary["files"] = [p.name for p in files]
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def title(summary: dict[str, Any]) -> str:
    """'RefCOCO val (unc)'-style name of a summary's split."""
    name = DATASET_NAMES.get(str(summary.get("dataset")), str(summary.get("dataset")))
    by = f" ({summary['split_by']})" if summary.get("split_by") else ""
    return f"{name} {summary.get('split')}{by}"


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table of one split: our mIoU/oIoU beside the paper's, Pr@X, n and errors per variant."""
    prs = [pr_key(t) for t in summary.get("pr_thresholds", PR_THRESHOLDS)]
    head = ["Method", "mIoU", "paper mIoU", "oIoU", "paper oIoU", *prs, "n", "errors", "s/sent"]
    lines = [f"### {title(summary)}: preset {summary.get('preset')}, text `{summary.get('text')}`, "
             f"seed {summary.get('seed')}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    notes: list[str] = []
    for name, v in summary["variants"].items():
        paper = v.get("paper") or {}
        row = [display_name(name), _fmt(v["mIoU"]), _fmt(paper.get("mIoU")), _fmt(v["oIoU"]),
               _fmt(paper.get("oIoU")), *[_fmt(v.get(k)) for k in prs], str(v["n"]), str(v["errors"]),
               _fmt(v.get("seconds_per_sentence"))]
        lines.append("| " + " | ".join(row) + " |")
        if v["errors"]:
            kinds = ", ".join(f"{k}: {n}" for k, n in v["errors_by_kind"].items())
            notes.append(f"- {display_name(name)}: {v['errors']} sentence(s) not scored ({kinds}); "
                         "see the `error` lines of the results files.")
        if v.get("missing"):
            notes.append(f"- {display_name(name)}: {v['missing']} of {summary['n_sentences']} "
                         "sentence(s) not evaluated yet (run again with --resume).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def paper_layout(summaries: Sequence[dict[str, Any]], metric: str = "mIoU") -> str:
    """The paper's layout over several splits: a row per method, a column per dataset/split, 'ours (paper)'.

    When the folders were run with more than one preset (e.g. `official` and `fast`), each preset's variants are
    rows of their own ("Ref-Diff [fast]"), so that a split evaluated under two presets fills two rows of one
    column instead of two columns of one name."""
    def order(s: dict[str, Any]) -> tuple[int, int]:
        ds = list(DATASET_NAMES).index(s["dataset"]) if s.get("dataset") in DATASET_NAMES else 99
        sp = SPLIT_ORDER.index(s["split"]) if s.get("split") in SPLIT_ORDER else 99
        return ds, sp

    presets = list(dict.fromkeys(str(s.get("preset")) for s in summaries))
    by_preset = len(presets) > 1
    titles = list(dict.fromkeys(title(s) for s in sorted(summaries, key=order)))
    cells_of: dict[tuple[str, str], dict[str, Any]] = {}  # (preset, split title) -> that folder's summary
    for s in summaries:
        cells_of[(str(s.get("preset")), title(s))] = s
    lines = [f"{metric} (%), ours (paper)", "", "| Method | " + " | ".join(titles) + " |",
             "|---|" + "---:|" * len(titles)]
    for preset in presets:
        mine = [s for s in summaries if str(s.get("preset")) == preset]
        names = _ordered(list(dict.fromkeys(n for s in mine for n in s["variants"])))
        for name in names:
            cells = []
            for t in titles:
                s = cells_of.get((preset, t))
                v = None if s is None else s["variants"].get(name)
                if v is None:
                    cells.append("")
                    continue
                paper = (v.get("paper") or {}).get(metric)
                cells.append(_fmt(v.get(metric)) + (f" ({paper:.2f})" if paper is not None else ""))
            label = display_name(name) + (f" [{preset}]" if by_preset else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write results.json (the summary) and results.md (the table) into the results folder."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    md = [format_table(summary), "", "mIoU: mean of per-sentence IoU; oIoU: total intersection / total union; "
          "Pr@X: share of sentences with IoU >= X; all in percent. Sentences that could not be scored are "
          "counted under errors, not as IoU 0.", ""]
    md_path.write_text("\n".join(md), encoding="utf-8")
    return json_path, md_path


__all__ = ["VARIANT_ORDER", "DISPLAY_NAMES", "SPATIAL_TERM_NAMES", "display_name", "PAPER_FIGURES",
           "paper_figures", "summarize_records",
           "summarize_folder", "format_table", "paper_layout", "write_results", "title"]
