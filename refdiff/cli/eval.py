"""``refdiff eval``: the command line of the benchmark evaluation (refdiff.evaluation) on RefCOCO/RefCOCO+/
RefCOCOg or PhraseCut: options, sharding from torchrun's environment, the run and its table.

Also runnable as ``python -m refdiff.evaluation`` and under ``torchrun`` (one shard per process, merged by
rank 0 at the end).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError, RefDiffError
from ..evaluation.datasets import DATASETS, SPLIT_BYS, EvalSet, dataset_overrides, load_dataset
from ..evaluation.records import check_manifest, rank_file, read_manifest, write_manifest
from ..evaluation.report import format_table, paper_layout, summarize_folder, write_results
from ..evaluation.runner import VariantSegmenter, canonical_variants, evaluate
from ..text import DEFAULT_NO_NOUN
from .options import HelpFormatter, add_shared_arguments, check_model_options, preset_overrides, report_error

PROG = "refdiff eval"

PICKLE_NOTE = ("The refs(*).p files are Python pickles. They are read only from the --data-root you name, with "
               "a restricted unpickler that accepts plain lists, dicts, strings and numbers and refuses "
               "anything else, so a tampered file fails instead of running code.")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `refdiff eval` to a parser (also used by `python -m refdiff.evaluation`)."""
    parser.description = (parser.description or "") + (
        "Evaluate Ref-Diff on RefCOCO/RefCOCO+/RefCOCOg (refer layout) or PhraseCut: mIoU, oIoU, Pr@0.5-0.9 "
        "per variant, beside the paper's figures. " + PICKLE_NOTE)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="benchmark to evaluate")
    data.add_argument("--split", help="refcoco/refcoco+: val, testA, testB; refcocog (umd): val, test; "
                                      "refcocog (google): val; phrasecut: val, test, miniv")
    data.add_argument("--split-by", choices=SPLIT_BYS, default=None,
                      help="which refs file: refs(SPLIT_BY).p; unset: unc for refcoco and refcoco+, umd for refcocog")
    data.add_argument("--data-root", type=Path, help="folder holding refcoco/, refcoco+/, refcocog/ (refs(*).p and "
                      "instances.json) and images/mscoco/images/train2014/ (or VGPhraseCut_v0/ for phrasecut). "
                      "Its refs pickles are read with a restricted unpickler (plain data only).")
    data.add_argument("--image-dir", type=Path, default=None, help="folder of the COCO train2014 images, "
                      "if not under the data root")
    data.add_argument("--text", choices=("sent", "raw"), default="sent",
                      help="sentence field: 'sent' (lower-cased, tokenised) or 'raw' (as typed)")
    data.add_argument("--limit", type=int, default=None, help="only the first N sentences (in image order)")
    run = parser.add_argument_group("run")
    run.add_argument("--variants", default="full", help="comma-separated, any of full,G,GS,DS,sam-clip,G-refine,cluster,prompted; "
                     "all listed variants share one model call per sentence")
    run.add_argument("-o", "--output", type=Path, default=None, help="results folder (JSONL per sentence, "
                     "run.json, results.json, results.md)")
    run.add_argument("--resume", action="store_true", help="continue a results folder: skip the (sentence, "
                     "variant) pairs it already holds; error lines are retried")
    run.add_argument("--shard-index", type=int, default=None, help="this process's shard (images i with "
                     "i %% num_shards == shard_index); default: $RANK under torchrun, else 0")
    run.add_argument("--num-shards", type=int, default=None, help="number of shards; default: $WORLD_SIZE "
                     "under torchrun, else 1. Merge the shards with --merge")
    run.add_argument("--merge", type=Path, default=None, metavar="RESULTS_DIR",
                     help="only merge the result files of RESULTS_DIR and write its table")
    run.add_argument("--table", type=Path, nargs="+", default=None, metavar="RESULTS_DIR",
                     help="print the paper-layout mIoU and oIoU tables of several results folders")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_shared_arguments(parser)  # --preset ... --set, the models, --device, --offload: as `refdiff segment`


def shard_of(args: argparse.Namespace) -> tuple[int, int, bool]:
    """(rank, world size, under torchrun): explicit --shard-index/--num-shards win over $RANK/$WORLD_SIZE."""
    if args.shard_index is not None or args.num_shards is not None:
        world = args.num_shards if args.num_shards is not None else 1
        rank = args.shard_index if args.shard_index is not None else 0
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"--shard-index {rank} must be in [0, --num-shards {world})")
        return rank, world, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, world > 1 and "MASTER_ADDR" in os.environ


def rank_device(device: str | None) -> str | None:
    """Under torchrun, put each process on cuda:$LOCAL_RANK (for --device unset or 'cuda')."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    torch.cuda.set_device(int(local))
    return f"cuda:{int(local)}"


def build_manifest(args: argparse.Namespace, evalset: EvalSet, variants: list[str],
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """run.json content: what is evaluated and with which models (the same on every shard)."""
    def model_path(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    return {"dataset": evalset.dataset, "split": evalset.split, "split_by": evalset.split_by,
            "text": "phrase" if evalset.dataset == "phrasecut" else args.text, "preset": args.preset,
            "overrides": overrides, "seed": args.seed, "sd": model_path(args.sd), "sam": model_path(args.sam),
            "clip": model_path(args.clip), "sd_config": model_path(args.sd_config), "vae": model_path(args.vae),
            "dtype": args.dtype, "variants": variants,
            **({"sam3": model_path(args.sam3)} if getattr(args, "sam3", None) else {}),
            "n_sentences": evalset.n_sentences, "limit": args.limit, "refdiff_version": __version__}


def load_model(args: argparse.Namespace, overrides: dict[str, Any], device: str | None = None) -> VariantSegmenter:
    """RefDiff.from_pretrained with the command line's model options, on ``device`` (default: --device)."""
    from ..pipeline import RefDiff

    return RefDiff.from_pretrained(sd=args.sd, sam=args.sam, clip=args.clip, preset=args.preset,
                                   **({"sam3": args.sam3} if getattr(args, "sam3", None) else {}),
                                   device=args.device if device is None else device, dtype=args.dtype,
                                   sd_config=args.sd_config, sd_vae=args.vae, offload=args.offload,
                                   no_noun=DEFAULT_NO_NOUN, **overrides)


def _print_summary(out_dir: Path) -> None:
    summary = summarize_folder(out_dir)
    json_path, md_path = write_results(out_dir, summary)
    print(format_table(summary))
    print(f"wrote {json_path} and {md_path}")


def _run(args: argparse.Namespace, model: VariantSegmenter | None) -> int:
    if args.table:
        summaries = [summarize_folder(d) for d in args.table]
        print(paper_layout(summaries, "mIoU"))
        print(paper_layout(summaries, "oIoU"))
        return 0
    if args.merge is not None:
        _print_summary(args.merge)
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("dataset", "split", "data_root") if getattr(args, n) is None]
    if args.output is None:
        missing.append("-o/--output")
    if missing:
        raise InputError(f"refdiff eval needs {', '.join(missing)} (or --merge RESULTS_DIR / --table DIRS)")
    variants = canonical_variants([v for v in args.variants.split(",") if v.strip()])
    overrides = preset_overrides(args)
    overrides.update(dataset_overrides(args.dataset, args.preset, overrides))
    rank, world, distributed = shard_of(args)
    device = None
    if model is None:  # the models load lazily: check their files before the first sentence needs them
        device = rank_device(args.device)
        check_model_options(args, device)
    evalset = load_dataset(args.dataset, args.data_root, args.split, split_by=args.split_by,
                           image_dir=args.image_dir, text=args.text).limited(args.limit)
    out_dir: Path = args.output
    manifest = build_manifest(args, evalset, variants, overrides)
    check_manifest(out_dir, manifest)
    own = rank_file(out_dir, rank, world)
    if not args.resume and own.is_file() and own.stat().st_size > 0:
        raise InputError(f"{own} already holds results; pass --resume to continue it, or choose another -o folder")
    old = read_manifest(out_dir) or {}
    manifest["variants"] = list(dict.fromkeys([*(old.get("variants") or []), *variants]))
    write_manifest(out_dir, manifest)
    if distributed:
        _init_distributed()
    if model is None:
        model = load_model(args, overrides, device)
    report = evaluate(model, evalset, variants, out_dir, seed=args.seed, rank=rank, world_size=world,
                      resume=args.resume, progress=not args.no_progress and (rank == 0 or not distributed))
    print(f"shard {rank}/{world}: {report.n_results} result and {report.n_errors} error line(s) written to "
          f"{report.path}; {report.n_skipped} pair(s) already done", file=sys.stderr)
    if world == 1:
        _print_summary(out_dir)
    elif distributed:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _print_summary(out_dir)
        dist.destroy_process_group()
    else:
        print(f"when every shard is done: refdiff eval --merge {out_dir}", file=sys.stderr)
    return 0


def _init_distributed() -> None:
    """Join torchrun's process group (gloo, CPU only: used for the final barrier, not for tensors)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))


def run_eval(args: argparse.Namespace, model: VariantSegmenter | None = None) -> int:
    """Run `refdiff eval` with parsed arguments; returns the exit status (2 on a bad input or file).

    ``model`` replaces the one built from --sd/--sam/--clip (anything with segment_variants/clear_cache).
    """
    try:
        return _run(args, model)
    except RefDiffError as exc:
        return report_error(PROG, exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m refdiff.evaluation`."""
    parser = argparse.ArgumentParser(prog="python -m refdiff.evaluation",
                                     formatter_class=HelpFormatter)
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


__all__ = ["add_eval_arguments", "run_eval", "main", "shard_of", "rank_device", "load_model", "build_manifest",
           "PICKLE_NOTE"]
