"""The command line: help, outputs on tiny models, the options both commands share, and errors that name the
bad input before any model loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refdiff import cli
from refdiff.cli.options import preset_value
from refdiff.cli.segment import overlay
from refdiff.config import OFFICIAL
from refdiff.downloads import SAM_DEFAULT_DIR, SAM_DOWNLOAD_NOTE
from refdiff.pipeline import RefDiff

REPO = Path(__file__).resolve().parents[1]
SHARED = ["--sd", "--sd-config", "--sam", "--clip", "--device", "--dtype", "--preset", "--offload", "--seed",
          "--image-size", "--set"]


def flat(text: str) -> str:
    """Help and messages wrapped to the terminal, as one line."""
    return " ".join(text.split())


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 51, 3), dtype=np.uint8)).save(path)
    return path


def test_help_explains_every_option_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "--help"])
    assert info.value.code == 0
    out = flat(capsys.readouterr().out)
    for option in ["--variant", "--overlay", "--json", "--quiet", *SHARED]:
        assert option in out
    assert "default: official" in out and "ViT-B-16/openai" in out


def test_both_commands_share_the_same_options():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the subcommand parsers
    for option in SHARED:
        seg, ev = (commands[c]._option_string_actions.get(option) for c in ("segment", "eval"))
        assert seg is not None and ev is not None, option
        assert (seg.help, seg.default, seg.choices) == (ev.help, ev.default, ev.choices), option


def test_each_cli_module_imports_alone_and_the_library_never_imports_the_cli():
    modules = ["refdiff.cli", "refdiff.cli.options", "refdiff.cli.segment", "refdiff.cli.eval",
               "refdiff.evaluation.__main__"]
    for name in modules:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (name, proc.stderr)
    code = ("import sys, refdiff.evaluation, refdiff.evaluation.runner, refdiff.evaluation.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('refdiff.cli')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_missing_image_is_named(tmp_path, capsys):
    code = cli.main(["segment", str(tmp_path / "nope.png"), "the cat", "-o", str(tmp_path / "m.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.png" in err and "no such file" in err


def tiny_from_pretrained(seen: dict):
    """A from_pretrained that records its arguments and builds random-weight models, preset fields as given."""
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.testing.sd import tiny_sd

    def fake(cls, sd=None, sam=None, clip=None, preset="official", device=None, dtype=None, sd_config=None,
             sd_vae=None, **kwargs):
        seen.update(sd=sd, sam=sam, clip=clip, preset=preset, device=device, dtype=dtype, kwargs=kwargs)
        return RefDiff(sd=tiny_sd(), sam=tiny_sam(), clip=tiny_clip(), preset=preset, **kwargs)

    return classmethod(fake)


def test_segment_writes_mask_overlay_and_json(tmp_path, image, monkeypatch, capsys):
    seen: dict = {}
    monkeypatch.setattr(RefDiff, "from_pretrained", tiny_from_pretrained(seen))
    sam = tmp_path / "x.pth"
    sam.write_bytes(b"")  # named, so it must exist; the fake loader never reads it
    out, over, js = tmp_path / "mask.png", tmp_path / "more" / "over.png", tmp_path / "more" / "s.json"
    code = cli.main(["segment", str(image), "the dog on the right", "-o", str(out), "--overlay", str(over),
                     "--json", str(js), "--preset", "paper", "--image-size", "64", "--variant", "GS",
                     "--sam", str(sam), "--seed", "2", "--set", "sam_points_per_side=4",
                     "--set", "sam_pred_iou_thresh=0", "--set", "sam_stability_score_thresh=0"])
    assert code == 0, capsys.readouterr().err
    assert seen["preset"] == "paper" and seen["sam"] == str(sam) and seen["kwargs"]["image_size"] == 64
    mask = np.asarray(Image.open(out))
    assert mask.shape == (37, 51) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(over)).shape == (37, 51, 3)
    data = json.loads(js.read_text())
    assert data["root_token"] == "dog" and data["direction"] == ["right"] and data["variant"] == "GS"
    assert len(data["scores"]["fused"]) == len(data["proposal_areas"])
    if data["chosen"] >= 0:
        assert data["mask_area"] == data["proposal_areas"][data["chosen"]] == int((mask > 0).sum())


def test_segment_set_changes_the_preset_for_one_image(tmp_path, image, monkeypatch, capsys):
    """The official area filter (masks of <= 10000 px dropped) leaves nothing on a 37 x 51 image; --set
    sam_min_area=0 keeps SAM's masks, and --set reaches the preset with its JSON types."""
    seen: dict = {}
    monkeypatch.setattr(RefDiff, "from_pretrained", tiny_from_pretrained(seen))
    base = ["segment", str(image), "the dog", "-o", str(tmp_path / "m.png"), "--image-size", "64",
            "--variant", "DS", "--set", "sam_points_per_side=4", "--set", "sam_pred_iou_thresh=0",
            "--set", "sam_stability_score_thresh=0"]
    runs = {}
    for name, extra in (("filtered", []), ("kept", ["--set", "sam_min_area=0", "--set", "sam_keep_largest=null"])):
        js = tmp_path / f"{name}.json"
        assert cli.main(base + extra + ["--json", str(js)]) == 0, capsys.readouterr().err
        runs[name] = json.loads(js.read_text())
    assert seen["kwargs"]["sam_points_per_side"] == 4 and seen["kwargs"]["sam_min_area"] == 0
    assert seen["kwargs"]["sam_keep_largest"] is None and seen["kwargs"]["sam_pred_iou_thresh"] == 0.0
    assert runs["filtered"]["proposal_areas"] == [] and runs["filtered"]["chosen"] == -1
    assert len(runs["kept"]["proposal_areas"]) > 0 and runs["kept"]["chosen"] >= 0


@pytest.mark.parametrize("item, message", [
    ("sam_points_per_sid=16", "--set sam_points_per_sid=16: there is no preset field 'sam_points_per_sid'; "
                              "did you mean sam_points_per_side"),
    ("sam_points_per_side=many", "--set sam_points_per_side=many: sam_points_per_side takes an integer, e.g. "
                                 "--set sam_points_per_side=32 (the official preset's value)"),
    ("resize_filter=nearest", "resize_filter takes one of 'bilinear', 'lanczos'"),
    ("use_cfg=1", "use_cfg takes true or false, e.g. --set use_cfg=true"),
    ("thresholds=0.5", "thresholds takes a JSON list of numbers"),
    ("sam_keep_largest=all", "sam_keep_largest takes an integer or null, e.g. --set sam_keep_largest=10"),
    ("sam_min_area", "--set 'sam_min_area': expected FIELD=VALUE, e.g. --set sam_points_per_side=16"),
    ("name=paper", "the preset is chosen with --preset"),
])
@pytest.mark.parametrize("command", ["segment", "eval"])
def test_bad_set_is_named_the_same_by_both_commands_before_models_load(command, item, message, tmp_path, image,
                                                                       loud_loaders, capsys):
    argv = {"segment": ["segment", str(image), "the dog", "-o", str(tmp_path / "m.png")],
            "eval": ["eval", "--dataset", "refcoco", "--split", "val", "--data-root", str(tmp_path / "none"),
                     "-o", str(tmp_path / "res")]}[command]
    assert cli.main(argv + ["--set", item]) == 2
    err = flat(capsys.readouterr().err)
    assert err.startswith(f"refdiff {command}: error: ") and message in err
    assert not (tmp_path / "res").exists()


def test_set_values_take_the_field_types():
    cases = {"sam_keep_largest=null": None, "sam_keep_largest=None": None, "sam_keep_largest=3": 3,
             "thresholds=[0.3,0.6]": (0.3, 0.6), "use_cfg=false": False, "gen_weight=1": 1.0,
             "prompt_suffix=1": "1", 'prompt_suffix=" "': " ", "capture_blocks=[\"up\"]": ("up",),
             "refine_factor_weights=[[8,0.3]]": ((8, 0.3),), "capture_kind=probs": "probs"}
    for item, expected in cases.items():
        name, raw = item.split("=", 1)
        value = preset_value(OFFICIAL, name, raw)
        assert value == expected and type(value) is type(expected), item
        assert OFFICIAL.with_(**{name: value}) is not None


def test_image_size_and_set_image_size_must_agree(tmp_path, image, loud_loaders, capsys):
    argv = ["segment", str(image), "the dog", "-o", str(tmp_path / "m.png"), "--image-size", "512"]
    assert cli.main(argv + ["--set", "image_size=768"]) == 2
    assert "--image-size 512 and --set image_size=768 disagree" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["sam", "sd-file", "sd-folder", "clip", "sd-config", "vae", "image", "device",
                                  "output", "overlay-folder"])
def test_every_named_file_is_checked_before_any_model_loads(case, tmp_path, image, loud_loaders, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    empty = tmp_path / "empty"
    empty.mkdir()
    extra, source, expected = {
        "sam": (["--sam", str(tmp_path / "sam_vit_b.pth")], None,
                [f"--sam {tmp_path / 'sam_vit_b.pth'}: no such file", "sam_vit_b_01ec64.pth", "leave --sam out"]),
        "sd-file": (["--sd", str(tmp_path / "v1-5.safetensors")], None,
                    [f"--sd {tmp_path / 'v1-5.safetensors'}: no such file or folder, and not a hub id"]),
        "sd-folder": (["--sd", str(empty)], None, [f"--sd {empty}: the folder has no model_index.json"]),
        "clip": (["--clip", str(tmp_path / "clip.safetensors")], None,
                 [f"--clip {tmp_path / 'clip.safetensors'}: no such file", "ViT-B-16/openai"]),
        "sd-config": (["--sd-config", "sd3"], None, ["--sd-config sd3: neither one of sd1, sd2, sd2-v, sdxl"]),
        "vae": (["--vae", str(tmp_path / "sdxl_vae.safetensors")], None,
                [f"--vae {tmp_path / 'sdxl_vae.safetensors'}: no such file or folder", "leave --vae out"]),
        "image": ([], tmp_path / "nope.png", ["nope.png", "no such file"]),
        "device": (["--device", "cuda"], None, ["--device cuda:", "CUDA is not available"]),
        "output": (["-o", str(tmp_path / "mask.msk")], None, ["-o/--output", "cannot write an image", ".png"]),
        "overlay-folder": (["--overlay", str(empty)], None, [f"--overlay {empty}: is a folder"]),
    }[case]
    argv = ["segment", str(source or image), "the dog", "-o", str(tmp_path / "m.png"), *extra]
    assert cli.main(argv) == 2
    err = flat(capsys.readouterr().err)
    assert err.startswith("refdiff segment: error: ") and all(e in err for e in expected), err


def test_hub_ids_and_clip_tags_are_not_taken_for_missing_files(tmp_path, image, loud_loaders):
    """Only local paths are checked: a hub id and an open_clip tag go on to the loaders."""
    argv = ["segment", str(image), "the dog", "-o", str(tmp_path / "m.png"), "--sd", "someone/sd-model",
            "--clip", "ViT-B-16/openai", "--device", "cpu"]
    with pytest.raises(AssertionError, match="called before"):
        cli.main(argv)


def test_sam_download_folder_is_one_truth_in_code_help_message_and_readme(tmp_path, monkeypatch, capsys):
    from refdiff.sam import sam_cache_dir

    for name in ("REFDIFF_SAM_DIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert sam_cache_dir() == Path(SAM_DEFAULT_DIR).expanduser() == tmp_path / ".cache/torch/hub/checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert sam_cache_dir() == tmp_path / "th" / "hub" / "checkpoints"  # "$TORCH_HOME/hub/checkpoints"
    monkeypatch.setenv("REFDIFF_SAM_DIR", str(tmp_path / "sams"))
    assert sam_cache_dir() == tmp_path / "sams"
    assert SAM_DEFAULT_DIR in SAM_DOWNLOAD_NOTE and "$REFDIFF_SAM_DIR" in SAM_DOWNLOAD_NOTE
    assert SAM_DOWNLOAD_NOTE in flat((REPO / "README.md").read_text())
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    assert f"Default: vit_h, downloaded once to {SAM_DOWNLOAD_NOTE}" in flat(capsys.readouterr().out)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    assert cli.main(["segment", str(tmp_path / "x.png"), "t", "-o", str(tmp_path / "m.png"), "--sam", "no.pth"]) == 2
    assert f"leave --sam out to download vit_h once to {tmp_path / 'sams'}" in flat(capsys.readouterr().err)


def test_overlay_tints_only_the_mask():
    rgb = np.zeros((2, 2, 3), np.uint8)
    mask = np.array([[True, False], [False, False]])
    out = overlay(rgb, mask, color=(200, 0, 0), opacity=0.5)
    assert out[0, 0].tolist() == [100, 0, 0] and out[1, 1].tolist() == [0, 0, 0]


def test_segment_no_noun_error_refuses_a_text_with_no_object_before_models_load(tmp_path, image, loud_loaders,
                                                                                capsys):
    code = cli.main(["segment", str(image), "on the left", "-o", str(tmp_path / "m.png"), "--no-noun", "error"])
    assert code == 2
    err = flat(capsys.readouterr().err)
    assert "text 'on the left' names no object" in err and "add the object's noun" in err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("text", ["...", "  ", "?!"])
def test_segment_refuses_an_empty_or_punctuation_only_text_before_models_load(tmp_path, image, loud_loaders,
                                                                               capsys, text):
    assert cli.main(["segment", str(image), text, "-o", str(tmp_path / "m.png")]) == 2
    err = flat(capsys.readouterr().err)
    assert ("text is empty" in err or "holds only punctuation" in err) and "give a referring expression" in err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("text", ["on the left", "the second from the left", "leftmost", "the biggest one",
                                  "the one on the right", "the white thing on the left"])
def test_segment_runs_a_text_naming_no_object_by_default_and_prints_the_warning_once(tmp_path, image, monkeypatch,
                                                                                     capsys, text):
    seen: dict = {}
    monkeypatch.setattr(RefDiff, "from_pretrained", tiny_from_pretrained(seen))
    code = cli.main(["segment", str(image), text, "-o", str(tmp_path / "m.png"), "--image-size", "64",
                     "--variant", "G", "--preset", "plus"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert seen["kwargs"]["no_noun"] == "warn"
    assert err.count("names no object") == 1 and f"refdiff segment: warning: text {text!r}" in err
    assert "the target class is open" in flat(err)
    assert (tmp_path / "m.png").exists()
