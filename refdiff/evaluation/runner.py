"""The evaluation loop: images in order (this rank's share), every sentence, all variants in one model call.

Sentences of one image share the image load, the ground truth of their ref and the model's per-image caches
(cleared after the image). Each (sentence, variant) is written as one JSON line as soon as it is computed;
``resume`` skips the ones a results folder already holds, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import get_variant
from ..errors import InputError, RefDiffError
from .datasets import EvalSet, ImageItem, Sentence, load_image_rgb, target_mask
from .metrics import mask_iou
from .records import Key, RecordWriter, done_keys, rank_file, record_key


class VariantSegmenter(Protocol):
    """What the loop needs from the model (refdiff.pipeline.RefDiff provides it)."""

    def segment_variants(self, image: Any, text: str, variants: Sequence[str], seed: int = 0) -> Mapping[str, Any]:
        """Results by variant name, each with mask [H, W], proposals [N, H, W], scores and index."""
        ...

    def clear_cache(self) -> None:
        """Forget the per-image caches (called after the last sentence of each image)."""
        ...


@dataclass
class ShardReport:
    """What one process wrote: its file and the counts of this call (skipped = already in the folder)."""

    path: Path
    n_sentences: int = 0  # sentences of this shard
    n_results: int = 0  # (sentence, variant) result lines written now
    n_errors: int = 0  # error lines written now
    n_skipped: int = 0  # (sentence, variant) pairs skipped by resume
    errors: list[str] = field(default_factory=list)  # the first few error messages


def canonical_variants(variants: Sequence[str]) -> list[str]:
    """Variant names as config.Variant spells them (full, G, GS, DS, sam-clip), without duplicates."""
    names: list[str] = []
    for v in variants:
        name = get_variant(v).name
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("no variant to evaluate; pass --variants full,G,GS,DS,sam-clip (or a subset)")
    return names


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _pick(results: Mapping[str, Any], name: str) -> Any:
    if name in results:
        return results[name]
    for key, value in results.items():
        if get_variant(key).name == name:
            return value
    raise KeyError(f"the model returned no result for variant {name!r} (got {sorted(results)})")


def chosen_scores(result: Any) -> dict[str, float | None]:
    """Each score kind (generative, discriminative, fused) of the chosen proposal, None when absent."""
    index = int(getattr(result, "index", -1))
    out: dict[str, float | None] = {}
    for kind, values in (getattr(result, "scores", None) or {}).items():
        if values is None or index < 0:
            out[kind] = None
            continue
        arr = _to_numpy(values).reshape(-1)
        out[kind] = float(arr[index]) if index < arr.size else None
    return out


def _base(sentence: Sentence, variant: str) -> dict[str, Any]:
    return {"ref_id": sentence.ref_id, "ann_id": sentence.ann_id, "image_id": sentence.image_id,
            "sent_id": sentence.sent_id, "sentence": sentence.text, "variant": variant}


def result_record(sentence: Sentence, variant: str, result: Any, gt: np.ndarray, seconds: float) -> dict[str, Any]:
    """The JSON line of one (sentence, variant): ids, IoU with its I and U, the choice and its scores."""
    mask = _to_numpy(result.mask).astype(bool)
    if mask.shape != gt.shape:
        raise RuntimeError(f"variant {variant} returned a mask of shape {mask.shape} for an image of shape "
                           f"{gt.shape}; masks must be at the image's own size")
    inter, union, iou = mask_iou(mask, gt)
    proposals = getattr(result, "proposals", None)
    return {**_base(sentence, variant), "iou": iou, "inter": inter, "union": union,
            "index": int(getattr(result, "index", -1)), "scores": chosen_scores(result),
            "n_proposals": int(len(proposals)) if proposals is not None else 0, "seconds": round(seconds, 4)}


def error_record(sentence: Sentence, variant: str, kind: str, message: str) -> dict[str, Any]:
    """The JSON line of a (sentence, variant) that could not be scored: counted apart, never as IoU 0."""
    return {**_base(sentence, variant), "error": message, "error_kind": kind}


def _oom_types() -> tuple[type[BaseException], ...]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return ()
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom,) if isinstance(oom, type) else ()


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after an out-of-memory error
        pass


class _Loop:
    """State of one evaluate() call: writer, counters, progress bar."""

    def __init__(self, model: VariantSegmenter, variants: list[str], writer: RecordWriter, report: ShardReport,
                 seed: int, bar: Any) -> None:
        self.model, self.variants, self.writer, self.report = model, variants, writer, report
        self.seed, self.bar = seed, bar
        self.oom = _oom_types()
        self.running: list[float] = []

    def error(self, sentence: Sentence, variants: Sequence[str], kind: str, message: str) -> None:
        for v in variants:
            self.writer.write(error_record(sentence, v, kind, message))
            self.report.n_errors += 1
        if len(self.report.errors) < 20:
            self.report.errors.append(f"sent {sentence.sent_id} ({kind}): {message}")

    def run_image(self, item: ImageItem, todo: dict[int, list[str]]) -> None:
        """Evaluate the pending (sentence, variants) of one image."""
        image, message = None, item.error
        if message is None:
            try:
                image = load_image_rgb(item.path)
            except InputError as exc:
                message = str(exc)
        if image is not None and item.height is not None and image.shape[:2] != (item.height, item.width):
            message = (f"image {item.path} is {image.shape[1]}x{image.shape[0]} but the annotations say "
                       f"{item.width}x{item.height}")
        gts: dict[Any, np.ndarray | str] = {}
        try:
            for idx, variants in todo.items():
                sentence = item.sentences[idx]
                if message is not None:
                    self.error(sentence, variants, "image", message)
                else:
                    self.run_sentence(item, sentence, variants, image, gts)
                self.bar.update(1)
        finally:
            self.model.clear_cache()

    def run_sentence(self, item: ImageItem, sentence: Sentence, variants: list[str], image: np.ndarray,
                     gts: dict[Any, np.ndarray | str]) -> None:
        """Score one sentence for all its pending variants with one segment_variants call."""
        gt = gts.get(sentence.ref_id)
        if gt is None:
            try:
                gt = target_mask(item.targets[sentence.ref_id], image.shape[0], image.shape[1])
            except InputError as exc:
                gt = str(exc)
            gts[sentence.ref_id] = gt
        if isinstance(gt, str):
            self.error(sentence, variants, "annotation", gt)
            return
        start = time.perf_counter()
        try:
            results = self.model.segment_variants(image, sentence.text, variants, seed=self.seed)
        except RefDiffError as exc:
            self.error(sentence, variants, "model", f"{type(exc).__name__}: {exc}")
            return
        except self.oom as exc:
            _free_gpu_memory()
            self.error(sentence, variants, "out_of_memory", str(exc).splitlines()[0] if str(exc) else "OOM")
            return
        seconds = time.perf_counter() - start
        for v in variants:
            record = result_record(sentence, v, _pick(results, v), gt, seconds)
            self.writer.write(record)
            self.report.n_results += 1
            if v == self.variants[0]:
                self.running.append(record["iou"])
        if self.running:
            self.bar.set_postfix_str(f"{self.variants[0]} mIoU {100 * float(np.mean(self.running)):.2f}",
                                     refresh=False)


Work = list[tuple[ImageItem, dict[int, list[str]]]]


def pending(shard: EvalSet, variants: list[str], skip: set[Key]) -> tuple[Work, int]:
    """Per image, the sentence indices with the variants still to do; and how many pairs were skipped."""
    out: Work = []
    skipped = 0
    for item in shard.images:
        todo: dict[int, list[str]] = {}
        for i, s in enumerate(item.sentences):
            left = [v for v in variants if record_key({"ref_id": s.ref_id, "sent_id": s.sent_id, "variant": v})
                    not in skip]
            skipped += len(variants) - len(left)
            if left:
                todo[i] = left
        if todo:
            out.append((item, todo))
    return out, skipped


def evaluate(model: VariantSegmenter, evalset: EvalSet, variants: Sequence[str], out_dir: str | Path, *,
             seed: int = 0, rank: int = 0, world_size: int = 1, resume: bool = False,
             progress: bool = True) -> ShardReport:
    """Evaluate this rank's images (i % world_size == rank) and append one JSON line per (sentence, variant).

    Without ``resume`` the rank's file must not hold results yet; with it, pairs already scored in any file
    of the folder are skipped (errors are retried).
    """
    out_dir = Path(out_dir)
    names = canonical_variants(variants)
    shard = evalset.shard(rank, world_size)
    path = rank_file(out_dir, rank, world_size)
    if not resume and path.is_file() and path.stat().st_size > 0:
        raise InputError(f"{path} already holds results; pass --resume to continue it, or choose another -o folder")
    skip = done_keys(out_dir) if resume else set()
    work, skipped = pending(shard, names, skip)
    report = ShardReport(path, n_sentences=shard.n_sentences, n_skipped=skipped)
    from tqdm.auto import tqdm

    total = sum(len(todo) for _, todo in work)
    desc = f"{evalset.dataset} {evalset.split}" + (f" [{rank}/{world_size}]" if world_size > 1 else "")
    with RecordWriter(path) as writer, tqdm(total=total, unit="sent", desc=desc, disable=not progress,
                                            dynamic_ncols=True, smoothing=0.05) as bar:
        loop = _Loop(model, names, writer, report, seed, bar)
        for item, todo in work:
            loop.run_image(item, todo)
    return report


__all__ = ["VariantSegmenter", "ShardReport", "canonical_variants", "chosen_scores", "result_record",
           "error_record", "pending", "evaluate"]
