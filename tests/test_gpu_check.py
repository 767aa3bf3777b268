"""benchmarks/gpu_check.py: the dry run (CPU, tiny models) takes the GPU check's code path without any CUDA call
and writes the same JSON and Markdown; without CUDA the real check refuses to start."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_CALLS = ("synchronize", "empty_cache", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated",
              "max_memory_reserved", "get_device_properties", "get_device_name", "current_device")


def _load():
    """Import benchmarks/gpu_check.py the way ``python benchmarks/gpu_check.py`` would."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run on a machine that reports no CUDA, with every other torch.cuda call made to fail, so that a
    missing guard shows."""
    out = tmp_path_factory.mktemp("gpu_check")
    check = _load()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        for name in CUDA_CALLS:
            mp.setattr(torch.cuda, name, lambda *a, _n=name, **k: pytest.fail(f"torch.cuda.{_n} called in a dry run"))
        code = check.main(["--dry-run", "--out", str(out), "--runs", "1", "--quiet"])
    return code, json.loads((out / check.JSON_NAME).read_text()), (out / check.MARKDOWN_NAME).read_text()


def test_dry_run_runs_every_configuration_and_writes_json_and_markdown(dry_run):
    code, results, table = dry_run
    assert code == 0
    meta = results["meta"]
    assert meta["dry_run"] and meta["device"] == "cpu" and meta["dtype"] == "fp16" and meta["sizes"] == [64, 128]
    assert [(r["size"], r["offload"]) for r in results["runs"]] == [(64, False), (128, False), (64, True), (128, True)]
    assert not results["skipped"]
    for r in results["runs"]:
        assert r["all_finite"] and r["finite"] == {"attention": True, "scores.generative": True,
                                                   "scores.discriminative": True, "scores.fused": True}
        assert {"sam", "vae", "unet", "map", "generative_score", "clip_full"} <= set(r["timings_s"])
        assert all(t >= 0 for t in r["timings_s"].values()) and r["wall_s"] >= sum(r["timings_s"].values())
        assert r["max_memory_allocated_mb"] is None and r["max_memory_reserved_mb"] is None  # no CUDA
        assert r["sam_runs"] == 1 and r["proposals"] == meta["fixed_proposals"] == 10 and 0 <= r["index"] < 10
        assert r["vae_encoder_outputs"] == ["torch.float16"]  # one fp16 encode, no float32 retry
        assert r["caches"]["entries"] > 0 and r["caches"]["tensors_off_cpu"] == 0
        assert r["mask_dtype"] == "bool" and r["attention_dtype"] == "float32"
    assert table.startswith("## GPU check:") and "dry run" in table
    assert table.count("\n| 64 |") == 2 and table.count("\n| 128 |") == 2


def test_without_cuda_it_refuses_with_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    check = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "CUDA" in captured.err and "--dry-run" in captured.err
    assert not (tmp_path / "out").exists()


def test_json_is_written_after_each_run_so_an_interrupted_check_keeps_its_results(tmp_path, monkeypatch):
    check = _load()
    original, calls = check.one_run, []

    def second_run_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout or Ctrl-C does to the check
        return original(*args, **kwargs)

    monkeypatch.setattr(check, "one_run", second_run_dies)
    with pytest.raises(KeyboardInterrupt):
        check.main(["--dry-run", "--out", str(tmp_path), "--runs", "1", "--sizes", "64", "--quiet"])
    results = json.loads((tmp_path / check.JSON_NAME).read_text())
    assert [(r["size"], r["offload"]) for r in results["runs"]] == [(64, False)]
    assert "| 64 | no | 1 |" in (tmp_path / check.MARKDOWN_NAME).read_text()


def test_runs_that_might_overrun_the_budget_are_skipped_and_listed(tmp_path):
    check = _load()
    # nothing ran, so nothing was checked: not a success
    assert check.main(["--dry-run", "--out", str(tmp_path), "--sizes", "64", "--budget-s", "0", "--quiet"]) == 3
    results = json.loads((tmp_path / check.JSON_NAME).read_text())
    assert results["runs"] == [] and len(results["skipped"]) == 4  # 2 configurations x 2 runs
    assert "Skipped to stay within the time budget" in (tmp_path / check.MARKDOWN_NAME).read_text()


def test_exit_code_needs_a_finished_run_and_finite_outputs():
    check = _load()
    assert check.exit_code({"runs": [], "skipped": [{"size": 64, "offload": False, "run": 1}]}) == 3
    assert check.exit_code({"runs": [], "skipped": []}) == 3
    assert check.exit_code({"runs": [{"all_finite": True}], "skipped": [{"size": 64}]}) == 0
    assert check.exit_code({"runs": [{"all_finite": True}, {"all_finite": False}], "skipped": []}) == 1
