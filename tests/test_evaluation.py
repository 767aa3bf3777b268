"""Benchmark evaluation: readers (refer/COCO/PhraseCut formats), metrics, error lines, resume, sharding."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refdiff.cli.eval import add_eval_arguments, run_eval
from refdiff.errors import InputError
from refdiff.evaluation import (dataset_overrides, load_dataset, load_refer, mask_iou, safe_load_pickle,
                                summarize_ious, target_mask)
from refdiff.evaluation.datasets import coco_segmentation_to_mask, load_phrasecut
from refdiff.evaluation.records import read_records, result_files

sys.path.insert(0, str(Path(__file__).parent))
from evaluation_data import (Interrupted, PlantedModel, gt_masks, make_phrasecut_data,  # noqa: E402
                             make_refer_data)

REPO = Path(__file__).resolve().parents[1]
VAL_FULL = [(24, 44), (44, 600), (5, 10), (10, 10), (0, 64)]  # (I, U) of the planted 'full' predictions
VAL_G = [(44, 600), (44, 600), (10, 600), (10, 600), (64, 256)]  # whole-image predictions


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def eval_args(data: Path, out: Path, *extra: str, dataset: str = "refcoco", split: str = "val") -> argparse.Namespace:
    return parse("--dataset", dataset, "--split", split, "--data-root", str(data), "-o", str(out),
                 "--no-progress", *extra)


def metrics_of(out: Path) -> dict:
    summary = json.loads((out / "results.json").read_text())
    return {name: {k: v[k] for k in ("n", "errors", "mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8",
                                     "Pr@0.9", "inter", "union") if k in v}
            for name, v in summary["variants"].items()}


def expected(pairs: list[tuple[int, int]]) -> dict:
    ious = np.array([i / u for i, u in pairs])
    out = {"n": len(pairs), "mIoU": 100 * ious.mean(),
           "oIoU": 100 * sum(i for i, _ in pairs) / sum(u for _, u in pairs)}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"Pr@{t:g}"] = 100 * float(np.mean(ious >= t))
    return out


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_refer_data(tmp_path / "data")


# ------------------------------------------------------------------------------------------------ readers
def test_refcoco_val_reader_gives_the_planted_masks(data: Path) -> None:
    ev = load_refer(data, "refcoco", "val")
    assert [im.image_id for im in ev.images] == [101, 102]
    assert [s.sent_id for s in ev.images[0].sentences] == [10, 11, 12, 13]
    assert ev.n_sentences == 5
    im = ev.images[0]
    assert (im.height, im.width) == (20, 30) and im.path.name == "COCO_train2014_000000000101.jpg"
    two_parts = target_mask(im.targets[1], 20, 30)
    assert two_parts.dtype == bool and two_parts.sum() == 44
    np.testing.assert_array_equal(two_parts, gt_masks()[1001])
    rle = target_mask(im.targets[2], 20, 30)
    np.testing.assert_array_equal(rle, gt_masks()[1002])
    assert np.argwhere(rle).tolist() == [[r, 2] for r in range(5, 15)]  # column-major runs: column 2
    np.testing.assert_array_equal(target_mask(ev.images[1].targets[3], 16, 16), gt_masks()[1003])
    # a degenerate part (2 points, no area) is ignored, not read as a box, and does not spoil the rest
    with_degenerate = coco_segmentation_to_mask([[3, 2, 9, 2, 9, 6, 3, 6], [1, 1, 12, 12]], 20, 30)
    np.testing.assert_array_equal(with_degenerate, gt_masks()[1001] & (np.arange(20) < 8)[:, None])


def test_compressed_rle_raw_text_and_broken_annotations(data: Path) -> None:
    ev = load_refer(data, "refcoco", "testB", text="raw")
    (im,) = ev.images
    assert [s.text for s in im.sentences] == ["BROKEN!", "SMALL BOX!", "GHOST!"]
    np.testing.assert_array_equal(target_mask(im.targets[6], 12, 14), gt_masks()[1006])
    with pytest.raises(InputError, match="corrupt polygon"):
        target_mask(im.targets[5], 12, 14)
    with pytest.raises(InputError, match="annotation id 9999"):
        target_mask(im.targets[7], 12, 14)


def test_splits_and_split_files(data: Path) -> None:
    assert [s.sent_id for im in load_refer(data, "refcoco+", "testA").images for s in im.sentences] == [31]
    assert load_refer(data, "refcocog", "val").n_sentences == 2  # umd by default
    assert load_refer(data, "refcocog", "test").n_sentences == 1
    assert load_refer(data, "refcocog", "val", split_by="google").n_sentences == 1
    assert load_refer(data, "refcoco", "train").n_sentences == 1
    with pytest.raises(InputError, match="valid splits: val, test"):
        load_refer(data, "refcocog", "testA")
    with pytest.raises(InputError, match="valid splits: val, testA, testB"):
        load_refer(data, "refcoco", "test")
    with pytest.raises(InputError, match=r"refs\(unc\)\.p"):
        load_refer(data / "nowhere", "refcoco", "val")
    (data / "refcoco+" / "refs(unc).p").unlink()
    with pytest.raises(InputError, match=r"missing .*refcoco\+/refs\(unc\)\.p"):
        load_refer(data, "refcoco+", "val")


def test_limit_and_shard_keep_image_order(data: Path) -> None:
    ev = load_refer(data, "refcoco", "val")
    lim = ev.limited(3)
    assert [s.sent_id for im in lim.images for s in im.sentences] == [10, 11, 12]
    assert [im.image_id for im in ev.shard(0, 2).images] == [101]
    assert [im.image_id for im in ev.shard(1, 2).images] == [102]
    with pytest.raises(InputError):
        ev.shard(2, 2)


def test_restricted_unpickler_reads_python2_pickles_and_refuses_code(tmp_path: Path) -> None:
    py2 = b"(lp0\n(dp1\nS'ref_id'\np2\nI7\nsS'sent'\np3\nS'caf\\xc3\\xa9'\np4\nsa."  # protocol 0, py2 str
    assert safe_load_pickle(py2) == [{"ref_id": 7, "sent": "café"}]
    assert safe_load_pickle(pickle.dumps([{"a": [1, 2.5, "x"]}], protocol=2)) == [{"a": [1, 2.5, "x"]}]
    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(InputError, match="os.system is not allowed"):
        safe_load_pickle(evil)
    assert not marker.exists()


def test_phrasecut_reader_union_of_instances(tmp_path: Path) -> None:
    root = make_phrasecut_data(tmp_path)
    ev = load_phrasecut(root, "val")
    (im,) = ev.images
    assert [s.text for s in im.sentences] == ["two boxes", "one box"] and (im.height, im.width) == (16, 16)
    both = target_mask(im.targets["201__1"], 16, 16)
    # PhraseCut's toolkit draws outline + fill: corners inclusive, 5x5 + 4x4 pixels
    expected_mask = np.zeros((16, 16), bool)
    expected_mask[2:7, 2:7] = True
    expected_mask[10:14, 10:14] = True
    np.testing.assert_array_equal(both, expected_mask)
    with pytest.raises(InputError, match="valid splits: val, test, miniv"):
        load_phrasecut(root, "testA")


# ------------------------------------------------------------------------------------------------ metrics
def test_iou_and_summary_hand_computed() -> None:
    a = np.zeros((4, 5), bool)
    a[0:2, 0:2] = True  # 4 px
    b = np.zeros((4, 5), bool)
    b[1:3, 0:3] = True  # 6 px, overlap 2
    assert mask_iou(a, b) == (2, 8, 0.25)
    empty = np.zeros((4, 5), bool)
    assert mask_iou(empty, empty) == (0, 0, 0.0)  # empty union: IoU 0, counted
    s = summarize_ious([0.25, 0.0, 0.5, 1.0], [2, 0, 3, 7], [8, 0, 6, 7])
    assert s["n"] == 4
    assert s["mIoU"] == pytest.approx(100 * 1.75 / 4)
    assert s["oIoU"] == pytest.approx(100 * 12 / 21)
    assert s["Pr@0.5"] == pytest.approx(50.0) and s["Pr@0.6"] == pytest.approx(25.0)
    assert summarize_ious([], [], [])["mIoU"] is None
    with pytest.raises(InputError):
        mask_iou(a, np.zeros((5, 4), bool))


# ------------------------------------------------------------------------------------------------ runs
def test_run_gives_hand_computed_metrics_and_jsonl(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "res"
    model = PlantedModel()
    assert run_eval(eval_args(data, out, "--variants", "full,G", "--seed", "3"), model=model) == 0
    got = metrics_of(out)
    for name, pairs in (("full", VAL_FULL), ("G", VAL_G)):
        for k, v in expected(pairs).items():
            assert got[name][k] == pytest.approx(v), (name, k)
        assert got[name]["errors"] == 0
    # shared work: one model call per sentence with both variants; one cache clear per image
    assert [c[1] for c in model.calls] == [("full", "G")] * 5 and {c[2] for c in model.calls} == {3}
    assert model.cleared == 2
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    first = lines[0]
    assert {k: first[k] for k in ("ref_id", "ann_id", "image_id", "sent_id", "sentence", "variant")} == \
        {"ref_id": 1, "ann_id": 1001, "image_id": 101, "sent_id": 10, "sentence": "left part", "variant": "full"}
    assert (first["inter"], first["union"], first["index"], first["n_proposals"]) == (24, 44, 1, 2)
    assert first["iou"] == pytest.approx(24 / 44)
    assert first["scores"] == {"generative": 0.75, "discriminative": None, "fused": 0.125}
    assert first["seconds"] >= 0
    printed = capsys.readouterr().out
    assert "| Ref-Diff |" in printed and "37.21" in printed and "Ref-Diff/G" in printed and "21.53" in printed
    md = (out / "results.md").read_text()
    assert "35.16" in md and "16.18" in md


def test_errors_are_lines_not_zero_iou(tmp_path: Path) -> None:
    data = make_refer_data(tmp_path / "data", missing_images=(102,))
    out = tmp_path / "val"
    assert run_eval(eval_args(data, out, "--variants", "full,DS"), model=PlantedModel()) == 0
    summary = json.loads((out / "results.json").read_text())
    for name in ("full", "DS"):
        v = summary["variants"][name]
        assert (v["n"], v["errors"], v["errors_by_kind"], v["missing"]) == (4, 1, {"image": 1}, 0)
    assert summary["variants"]["full"]["mIoU"] == pytest.approx(expected(VAL_FULL[:4])["mIoU"])
    errs = [r for r in read_records(result_files(out)).values() if "error" in r]
    assert {(r["sent_id"], r["variant"]) for r in errs} == {(14, "full"), (14, "DS")}
    assert "missing image" in errs[0]["error"] and "iou" not in errs[0]
    assert "1 sentence(s) not scored (image: 1)" in (out / "results.md").read_text()

    out_b = tmp_path / "testB"  # corrupt polygon, missing annotation, and a model error
    model = PlantedModel(raise_for=("small box",))
    assert run_eval(eval_args(data, out_b, split="testB"), model=model) == 0
    v = json.loads((out_b / "results.json").read_text())["variants"]["full"]
    assert (v["n"], v["errors"], v["errors_by_kind"]) == (0, 3, {"annotation": 2, "model": 1})
    assert v["mIoU"] is None
    assert [c[0] for c in model.calls] == ["small box"]  # no model call for sentences without ground truth


def test_resume_after_interrupt_equals_one_run(data: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_eval(eval_args(data, whole, "--variants", "full,GS"), model=PlantedModel()) == 0
    with pytest.raises(Interrupted):
        run_eval(eval_args(data, parts, "--variants", "full,GS"), model=PlantedModel(fail_after=3))
    assert len((parts / "results.jsonl").read_text().splitlines()) == 6  # 3 sentences x 2 variants, flushed
    assert run_eval(eval_args(data, parts, "--variants", "full,GS"), model=PlantedModel()) == 2  # no --resume
    with (parts / "results.jsonl").open("a") as fh:
        fh.write('{"ref_id": 2, "sent_id": 13, "vari')  # a line cut by the crash
    model = PlantedModel()
    assert run_eval(eval_args(data, parts, "--variants", "full,GS", "--resume"), model=model) == 0
    assert [c[0] for c in model.calls] == ["exact line", "square"]
    assert metrics_of(parts) == metrics_of(whole)
    lines = (parts / "results.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all(json.loads(x) for x in lines)


def test_resume_adds_a_variant_and_refuses_another_configuration(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    assert run_eval(eval_args(data, out, "--variants", "full"), model=PlantedModel()) == 0
    model = PlantedModel()
    assert run_eval(eval_args(data, out, "--variants", "full,G", "--resume"), model=model) == 0
    assert {c[1] for c in model.calls} == {("G",)} and len(model.calls) == 5
    assert set(metrics_of(out)) == {"G", "full"}
    assert run_eval(eval_args(data, out, "--variants", "full", "--resume", "--seed", "1"), model=PlantedModel()) == 2
    assert run_eval(eval_args(data, out, "--resume", split="testA"), model=PlantedModel()) == 2


def test_two_shards_and_merge_equal_one_run(data: Path, tmp_path: Path) -> None:
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert run_eval(eval_args(data, one, "--variants", "full,sam-clip"), model=PlantedModel()) == 0
    for rank in (0, 1):
        args = eval_args(data, sharded, "--variants", "full,sam-clip", "--shard-index", str(rank), "--num-shards", "2")
        assert run_eval(args, model=PlantedModel()) == 0
        if rank == 0:  # a merge before every shard is done shows what is missing
            assert run_eval(parse("--merge", str(sharded))) == 0
            partial = json.loads((sharded / "results.json").read_text())["variants"]["full"]
            assert (partial["n"], partial["missing"]) == (4, 1)  # image 101 (4 sentences) is shard 0's
            (sharded / "results.json").unlink()
    assert sorted(p.name for p in result_files(sharded)) == ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert not (sharded / "results.json").exists()
    assert run_eval(parse("--merge", str(sharded))) == 0
    assert metrics_of(sharded) == metrics_of(one)


def test_limit_counts_first_sentences(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    assert run_eval(eval_args(data, out, "--limit", "3"), model=PlantedModel()) == 0
    got = metrics_of(out)["full"]
    for k, v in expected(VAL_FULL[:3]).items():
        assert got[k] == pytest.approx(v)


def test_phrasecut_evaluation(tmp_path: Path) -> None:
    root = make_phrasecut_data(tmp_path / "pc")
    out = tmp_path / "res"
    model = PlantedModel()
    assert run_eval(eval_args(root, out, "--variants", "G", dataset="phrasecut"), model=model) == 0
    v = json.loads((out / "results.json").read_text())["variants"]["G"]  # whole-image predictions
    assert v["n"] == 2 and v["oIoU"] == pytest.approx(100 * (41 + 16) / 512)
    assert load_dataset("phrasecut", root, "val").n_sentences == 2


def test_table_of_several_folders(data: Path, tmp_path: Path, capsys) -> None:
    for split in ("val", "testA"):
        assert run_eval(eval_args(data, tmp_path / split, split=split), model=PlantedModel()) == 0
    capsys.readouterr()
    assert run_eval(parse("--table", str(tmp_path / "testA"), str(tmp_path / "val"))) == 0
    printed = capsys.readouterr().out
    assert "| Method | RefCOCO val (unc) | RefCOCO testA (unc) |" in printed
    assert f"| Ref-Diff | {expected(VAL_FULL)['mIoU']:.2f} (37.21) | 50.00 |" in printed


def test_main_cli_mounts_eval_and_passes_model_options(data: Path, tmp_path: Path, monkeypatch) -> None:
    from refdiff.cli import main
    from refdiff.pipeline import RefDiff

    seen: dict = {}

    def fake_from_pretrained(**kwargs):
        seen.update(kwargs)
        return PlantedModel()

    monkeypatch.setattr(RefDiff, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.set_device", lambda index: seen.setdefault("set_device", index))
    out, sd_folder, sam = tmp_path / "res", tmp_path / "sd-folder", tmp_path / "sam.pth"
    sd_folder.mkdir()
    (sd_folder / "model_index.json").write_text("{}")
    sam.write_bytes(b"")  # named files must exist; the fake loader never reads them
    argv = ["eval", "--dataset", "refcoco", "--split", "testA", "--data-root", str(data), "-o", str(out),
            "--no-progress", "--sd", str(sd_folder), "--sam", str(sam), "--clip", "ViT-B-16/openai", "--dtype", "fp16",
            "--preset", "paper", "--image-size", "512", "--set", "sam_min_area=5", "--set", "thresholds=[0.3,0.6]"]
    assert main(argv) == 0
    assert seen == {"sd": str(sd_folder), "sam": str(sam), "clip": "ViT-B-16/openai", "preset": "paper",
                    "device": "cuda:1", "dtype": "fp16", "sd_config": None, "sd_vae": None, "offload": False, "no_noun": "warn",
                    "image_size": 512,
                    "sam_min_area": 5, "sam_min_area_reference": None,
                    "thresholds": (0.3, 0.6), "set_device": 1}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["overrides"] == {"image_size": 512, "sam_min_area": 5, "sam_min_area_reference": None,
                                     "thresholds": [0.3, 0.6]}
    assert main(["eval", "--merge", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["variants"]["full"]["mIoU"] == pytest.approx(50.0)


@pytest.mark.parametrize("case", ["sam", "sd", "clip", "data-root", "set"])
def test_eval_checks_named_files_before_any_model_loads_or_result_is_written(case, data: Path, tmp_path: Path,
                                                                             loud_loaders, capsys) -> None:
    """A missing --sam used to surface only when the first sentence reached SAM (after SD ran), and then as an
    error line for every sentence; now the run stops before the models load and before -o is written."""
    from refdiff.cli import main

    out = tmp_path / "res"
    root, extra, expected = {
        "sam": (data, ["--sam", str(tmp_path / "sam_vit_h.pth")],
                [f"--sam {tmp_path / 'sam_vit_h.pth'}: no such file", "sam_vit_h_4b8939.pth", "leave --sam out"]),
        "sd": (data, ["--sd", str(tmp_path / "sd.ckpt")], [f"--sd {tmp_path / 'sd.ckpt'}: no such file or folder"]),
        "clip": (data, ["--clip", str(tmp_path / "c.bin")], [f"--clip {tmp_path / 'c.bin'}: no such file"]),
        "data-root": (tmp_path / "nowhere", [], [f"--data-root {tmp_path / 'nowhere'} is not a folder",
                                                 "refcoco/refs(unc).p"]),
        "set": (data, ["--set", "sam_min_aera=0"], ["no preset field 'sam_min_aera'; did you mean sam_min_area"]),
    }[case]
    argv = ["eval", "--dataset", "refcoco", "--split", "val", "--data-root", str(root), "-o", str(out),
            "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("refdiff eval: error: ") and all(e in err for e in expected), err
    assert not out.exists()


def test_missing_required_options_and_bad_split(data: Path, tmp_path: Path, capsys) -> None:
    assert run_eval(parse("--dataset", "refcoco")) == 2
    assert "--split" in capsys.readouterr().err
    assert run_eval(eval_args(data, tmp_path / "x", split="test"), model=PlantedModel()) == 2
    assert "valid splits: val, testA, testB" in capsys.readouterr().err


def test_module_entry_point_help_states_the_pickle_policy() -> None:
    proc = subprocess.run([sys.executable, "-m", "refdiff.evaluation", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "restricted unpickler" in text and "--shard-index" in text and "--merge" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_environment_two_processes_merge_on_rank0(data: Path, tmp_path: Path) -> None:
    """Two processes with torchrun's variables (RANK, WORLD_SIZE, MASTER_*): rank 0 merges after a barrier."""
    one, dist_out = tmp_path / "one", tmp_path / "dist"
    assert run_eval(eval_args(data, one, "--variants", "full,G"), model=PlantedModel()) == 0
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from evaluation_data import PlantedModel; "
            "from test_evaluation import eval_args; from refdiff.cli.eval import run_eval; from pathlib import Path; "
            "sys.exit(run_eval(eval_args(Path(sys.argv[2]), Path(sys.argv[3]), '--variants', 'full,G'), "
            "model=PlantedModel()))")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(data),
                                       str(dist_out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "| Ref-Diff |" in outs[0][0] and "| Ref-Diff |" not in outs[1][0]
    assert metrics_of(dist_out) == metrics_of(one)


@pytest.mark.slow
def test_end_to_end_tiny_pipeline(data: Path, tmp_path: Path) -> None:
    """All five variants through refdiff.pipeline.RefDiff built from tiny random-weight models."""
    from refdiff import pipeline
    import torch

    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.testing.sd import tiny_sd

    torch.manual_seed(0)
    fast = dict(image_size=64, sam_points_per_side=4, sam_points_per_batch=16, sam_pred_iou_thresh=0.0,
                sam_stability_score_thresh=0.0, sam_min_area=0)
    model = pipeline.RefDiff(sd=tiny_sd(), sam=tiny_sam(), clip=tiny_clip(), **fast)
    out = tmp_path / "res"
    assert run_eval(eval_args(data, out, "--variants", "full,G,GS,DS,sam-clip", "--limit", "3"), model=model) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["variants"]) == ["sam-clip", "G", "GS", "DS", "full"]
    records = list(read_records(result_files(out)).values())
    assert len(records) == 15 and not [r for r in records if "error" in r]
    for r in records:
        assert 0 <= r["inter"] <= r["union"] and 0.0 <= r["iou"] <= 1.0
        assert r["index"] == -1 or 0 <= r["index"] < r["n_proposals"]
    assert all(v["n"] == 3 for v in summary["variants"].values())
    # one segment_variants call per sentence gives what one call per variant gives
    ev = load_refer(data, "refcoco", "val")
    item = ev.images[0]
    from refdiff.evaluation.datasets import load_image_rgb

    image = load_image_rgb(item.path)
    gt = target_mask(item.targets[1], 20, 30)
    for name in ("full", "G", "sam-clip"):
        model.clear_cache()
        alone = model(image, "left part", variant=name, seed=0)
        rec = next(r for r in records if r["sent_id"] == 10 and r["variant"] == name)
        assert mask_iou(np.asarray(alone.mask, bool), gt)[:2] == (rec["inter"], rec["union"]), name


def test_official_preset_turns_the_area_filter_off_on_refcocog() -> None:
    absolute = {"sam_min_area_reference": None}  # the released code's filter is in pixels, at any image size
    assert dataset_overrides("refcocog", "official", {}) == {**absolute, "sam_min_area": 0}
    assert dataset_overrides("refcoco", "official", {}) == absolute
    assert dataset_overrides("refcocog", "paper", {}) == absolute
    assert dataset_overrides("refcocog", "official", {"sam_min_area": 500}) == absolute
    assert dataset_overrides("refcoco", "official", {"sam_min_area_reference": 307200}) == {}  # --set wins


def test_eval_tables_name_the_spatial_rows():
    from refdiff.config import spatial_rows
    from refdiff.evaluation.report import display_name, format_table, paper_layout, summarize_records

    rows = spatial_rows("full")
    assert [display_name(r) for r in rows] == [
        "Ref-Diff", "Ref-Diff + position (left, top)", "Ref-Diff + middle",
        "Ref-Diff + ordinals (second from the left)", "Ref-Diff + size (biggest)", "Ref-Diff + relations (next to X)", "Ref-Diff + negatives (other nouns)",
        "Ref-Diff + all spatial terms"]
    assert display_name("DS+size+middle") == "Ref-Diff/DS + size (biggest) + middle"
    assert display_name("full+colour") == "full+colour" and display_name("G") == "Ref-Diff/G"
    # records given in shuffled order come out base first, then each term, all terms last
    records = [{"variant": v, "iou": 0.5, "inter": 1, "union": 2} for v in reversed(rows + ["G"])]
    summary = summarize_records(records, {"dataset": "refcoco", "split": "val", "split_by": "unc",
                                          "n_sentences": 1})
    assert list(summary["variants"]) == ["G", *rows]
    table = format_table(summary)
    assert "| Ref-Diff + ordinals (second from the left) | 50.00 |" in table
    assert "| Ref-Diff + all spatial terms |" in paper_layout([summary])


def test_fast_preset_is_reported_as_its_own_rows():
    """`refdiff eval --table` over folders run with `official` and `fast`: one column per split, the fast
    preset's variants in rows of their own; one preset alone keeps the plain row names."""
    from refdiff.config import FAST, OFFICIAL, get_preset
    from refdiff.evaluation.report import paper_layout, summarize_records

    assert get_preset("fast") is FAST and FAST.proposal_mode == "prompted" and FAST.image_size == 512
    assert (FAST.use_cfg, FAST.max_steps) == (False, 1)
    assert FAST.with_(name="official", image_size=OFFICIAL.image_size, use_cfg=True, max_steps=None,
                      proposal_mode="automatic") == OFFICIAL  # only the speed options differ
    assert dataset_overrides("refcocog", "fast", {}) == dataset_overrides("refcocog", "official", {})

    def summary(preset: str, iou: float, split: str = "val") -> dict:
        records = [{"variant": "full", "iou": iou, "inter": 1, "union": 2}]
        return summarize_records(records, {"dataset": "refcoco", "split": split, "split_by": "unc",
                                           "preset": preset, "n_sentences": 1})

    table = paper_layout([summary("official", 0.5), summary("fast", 0.25), summary("official", 0.4, "testA")])
    head = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert head.count("RefCOCO val") == 1 and head.count("RefCOCO testA") == 1
    assert "| Ref-Diff [official] | 50.00 (37.21) | 40.00 |" in table
    assert "| Ref-Diff [fast] | 25.00 (37.21) |  |" in table
    assert "| Ref-Diff | 50.00 (37.21) |" in paper_layout([summary("official", 0.5)])
