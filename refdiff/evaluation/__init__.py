"""Benchmark evaluation: RefCOCO/RefCOCO+/RefCOCOg/PhraseCut readers, metrics, a resumable sharded runner."""
from __future__ import annotations

from .datasets import (EvalSet, ImageItem, Sentence, Target, coco_segmentation_to_mask, dataset_overrides,
                       load_dataset, load_phrasecut, load_refer, polygons_to_mask, target_mask)
from .metrics import PR_THRESHOLDS, mask_iou, summarize_ious
from .report import PAPER_FIGURES, format_table, paper_layout, summarize_folder, write_results
from .runner import ShardReport, evaluate
from .safe_pickle import load_refs_pickle, safe_load_pickle

__all__ = ["EvalSet", "ImageItem", "Sentence", "Target", "coco_segmentation_to_mask", "polygons_to_mask",
           "target_mask", "dataset_overrides", "load_dataset", "load_refer", "load_phrasecut", "PR_THRESHOLDS",
           "mask_iou", "summarize_ious", "PAPER_FIGURES", "format_table", "paper_layout", "summarize_folder",
           "write_results", "ShardReport", "evaluate", "load_refs_pickle", "safe_load_pickle"]
