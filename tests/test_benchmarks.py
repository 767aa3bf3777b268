"""The benchmark's short mode runs and produces a complete table: every stage at every size, every ratio,
finite values. No assertion on speed (timings depend on the machine)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

STAGES = ["prepare", "vae_encode", "text_encode", "unet_capture", "maps", "unet_refine", "sam_vit_b", "sam_vit_h",
          "threshold_proposals", "generative_scores", "clip_text", "clip_crop", "clip_masked", "fusion"]


def _load_run():
    """Import benchmarks/run.py the way ``python benchmarks/run.py`` would (it is not an installed package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run_under_test", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = _load_run()
    threads = torch.get_num_threads()
    try:
        code = run.main(["--mode", "short", "--out", str(out / "results.json"), "--markdown", str(out / "table.md"),
                         "--quiet"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    return code, results, (out / "table.md").read_text()


@pytest.mark.slow
def test_short_mode_exits_cleanly_and_writes_both_files(short_run):
    code, results, table = short_run
    assert code == 0
    assert results["meta"]["mode"] == "short" and results["meta"]["sizes"] == [64, 128]
    assert results["meta"]["repeats"] == 1 and results["meta"]["warmup"] == 1
    assert results["meta"]["torch_threads"] >= 1
    assert table.startswith("## Results: short mode")


@pytest.mark.slow
def test_every_stage_has_a_finite_time_and_memory_at_every_size(short_run):
    _, results, table = short_run
    rows = {row["key"]: row for row in results["stages"]["rows"]}
    assert list(rows) == STAGES
    for key, row in rows.items():
        for size in ("64", "128"):
            m = row["by_size"][size]
            assert _finite(m["median_s"]) and m["median_s"] > 0, (key, size)
            assert len(m["times_s"]) == 1 and len(m["warmup_s"]) == 1, (key, size)
            assert _finite(m["rss_delta_mb"]) and m["rss_delta_mb"] >= 0, (key, size)
            assert _finite(m["rss_peak_mb"]) and m["rss_peak_mb"] > 0, (key, size)
        assert row["label"] in table, key
    # stages independent of S are measured once and shown for both sizes
    assert rows["sam_vit_h"]["by_size"]["64"] == rows["sam_vit_h"]["by_size"]["128"]
    assert not rows["sam_vit_h"]["per_size"] and rows["unet_capture"]["per_size"]
    for size in ("64", "128"):
        total = sum(rows[k]["by_size"][size]["median_s"] for k in STAGES)
        assert results["stages"]["total_s"][size] == pytest.approx(total)


@pytest.mark.slow
def test_every_ratio_is_present_and_finite(short_run):
    _, results, table = short_run
    r = results["ratios"]
    for size in ("64", "128"):
        a = r["overhead"][size]
        assert _finite(a["ratio"]) and a["ratio"] > 0
        assert a["ratio"] == pytest.approx(a["end_to_end"]["median_s"] / a["forwards_total_s"])
        # forwards timed inside the end-to-end run itself: every model ran, and they fit inside the run
        assert set(a["in_run_forwards_s"]) == {"vae_encode", "text_encode", "unet_forwards", "sam", "clip_text",
                                               "clip_image"}
        assert all(v > 0 for v in a["in_run_forwards_s"].values())
        assert 1.0 <= a["in_run_ratio"] and _finite(a["in_run_ratio"])
        assert set(a["forwards_s"]) == {"vae_encode", "text_encode", "unet_forwards", "sam_vit_h", "clip_text",
                                        "clip_crop_forward", "clip_masked_forward"}
        assert a["end_to_end"]["extra"]["proposals"] == 10  # the fixed proposals reached the scorer
        assert a["end_to_end"]["extra"]["sam_runs"] == 2  # SAM really ran in the warm-up and measured run
        b = r["capture"][size]
        assert _finite(b["time_ratio"]) and b["steps"] == 2
        assert b["naive"] is not None and _finite(b["naive"]["rss_delta_mb"])  # tiny sizes: naive always runs
        # our capture replaces only the captured layers' processors; every other layer keeps its own
        assert b["processors_during_capture"].get("CaptureAttnProcessor", 0) >= 1
        assert sum(b["processors_during_capture"].values()) == sum(b["processors_default"].values())
    c = r["clip_scaling"]["rows"]
    assert sorted(int(n) for n in c) == [1, 10, 50, 100]
    assert c["1"]["crop_ratio"] == 1.0 and c["1"]["masked_ratio"] == 1.0
    assert all(_finite(row["crop_ratio"]) and _finite(row["masked_ratio"]) for row in c.values())
    d = r["sentences"]["rows"]
    assert sorted(int(k) for k in d) == [1, 3, 7]
    assert all(_finite(row["ratio"]) and row["ratio"] > 0 for row in d.values())
    cold = r["sentences"]["cold"]["median_s"]
    assert cold == r["overhead"]["64"]["end_to_end"]["median_s"]  # the cold run of (a) at the same S is reused
    assert all(row["cold_sum_s"] == pytest.approx(int(k) * cold) for k, row in d.items())
    # the first K sentences of one run: cumulative, so K = 7 took longer than K = 3, and SAM ran once per run
    assert d["1"]["together_s"] < d["3"]["together_s"] < d["7"]["together_s"]
    assert all(row["sam_runs"] == 1 for row in d.values())
    assert len(r["sentences"]["per_sentence_s"]) == 7 and len(set(r["sentences"]["sentences"])) == 7
    e = r["sam_settings"]["rows"]
    assert len(e) == 4 and e[0]["ratio"] == 1.0 and e[0]["label"].startswith("preset")
    assert all(_finite(row["ratio"]) and row["raw"] >= row["kept"] >= 0 for row in e)
    f = r["amg_batch"]
    assert f["candidates"] == 3 * f["points"] == 48
    assert [(row["image"], row["filter"]) for row in f["rows"]] == [
        ("benchmark image 80 x 60", "preset IoU filter"), ("benchmark image 80 x 60", "no IoU filter"),
        ("photo 400 x 300", "preset IoU filter"), ("photo 400 x 300", "no IoU filter")]
    for row in f["rows"]:
        assert row["kept_stock"] == row["kept_ours"]  # both generators keep the same masks
        assert _finite(row["time_ratio"]) and _finite(row["stock"]["rss_delta_mb"])
    assert f["rows"][1]["kept_ours"] == 48  # no filter: every candidate of the batch survives
    g = r["speed_options"]
    assert g["size"] == 64 and [row["label"] for row in g["rows"]][1:] == [
        "use_cfg=False", "max_steps=1", "use_cfg=False, max_steps=1"]
    assert g["rows"][0]["ratio"] == 1.0 and all(_finite(row["ratio"]) for row in g["rows"])
    for heading in ("(a) Overhead", "(b) Capture cost", "(c) CLIP scoring", "(d) K sentences", "(e) SAM",
                    "(f) One AMG batch", "(g) Speed options"):
        assert heading in table
    assert "nan" not in table.lower() and "None" not in table


def test_memory_monitor_sees_a_planted_allocation():
    """A stage that touches 200 MB must show a peak of about that much above its starting RSS."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.memory import MemoryMonitor

    with MemoryMonitor("cpu", interval_s=0.001) as mon:
        block = torch.ones(50 * 1024 * 1024, dtype=torch.float32)  # 200 MiB, every page written
        del block
    reading = mon.reading
    assert reading is not None and reading.samples >= 1
    assert 180 <= reading.rss_delta_mb <= 400
    assert reading.rss_peak_mb >= reading.rss_start_mb + 180


def test_timer_excludes_warmup_and_takes_the_median():
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import Timer

    calls = []
    timer = Timer(device=torch.device("cpu"), repeats=3, warmup=2)
    m, out = timer.measure("count", lambda: calls.append(1) or len(calls))
    assert len(calls) == 5 and out == 5
    assert len(m.warmup_times) == 2 and len(m.times) == 3 and len(m.memory) == 3
    assert m.median == sorted(m.times)[1]


def test_naive_capture_matches_the_unet_output_and_keeps_per_head_maps():
    """The naive baseline must compute what the UNet computes (else its memory is not comparable)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.naive_capture import NaiveStore, naive_capture
    from refdiff.testing.sd import tiny_sd

    sd = tiny_sd()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([51, 51])
    with torch.no_grad():
        ref = sd.unet(x, t, encoder_hidden_states=ctx).sample
        store = NaiveStore()
        with naive_capture(sd.unet, store) as count:
            out = sd.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert count == 2 * len(store.maps)  # one attn1 and one attn2 per transformer block; attn2 maps kept
    assert all(m.dtype == torch.float32 and m.shape[-1] == 77 and m.shape[0] == 2 * 4 for m in store.maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in store.maps)  # probabilities, per head


def test_interleaved_measurement_alternates_and_keeps_warmup_apart():
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import Timer

    order = []
    timer = Timer(device=torch.device("cpu"), repeats=2, warmup=1)
    runs, last = timer.measure_interleaved({"a": lambda: order.append("a") or "A", "b": lambda: order.append("b")})
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert last == {"a": "A", "b": None}
    assert all(len(m.warmup_times) == 1 and len(m.times) == 2 for m in runs.values())


def test_slow_measurements_use_their_own_counts():
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import Timer

    calls = []
    timer = Timer(device=torch.device("cpu"), repeats=3, warmup=1, slow_repeats=1, slow_warmup=0)
    m, _ = timer.measure("slow", lambda: calls.append(1), slow=True)
    assert len(calls) == 1 and len(m.times) == 1 and not m.warmup_times
    runs, _ = timer.measure_interleaved({"a": lambda: calls.append("a")}, slow=True)
    assert calls.count("a") == 1
    m, _ = timer.measure("fast", lambda: calls.append(2))
    assert calls.count(2) == 4 and len(m.times) == 3  # the others keep repeats + warm-up
    assert Timer(device=torch.device("cpu"), repeats=2, warmup=1).counts(slow=True) == (2, 1)  # default: same


def test_external_scoring_and_sam2_benchmarks_run_in_short_mode(tmp_path):
    """The two proposal benchmarks (benchmarks/external_scoring.py, sam2_amg.py) run on the tiny models and write
    every N / every model, with the ratios against their reference."""
    from benchmarks import external_scoring, sam2_amg

    pytest.importorskip("sam2")
    assert external_scoring.main(["--mode", "short", "--counts", "1", "5", "--repeats", "1",
                                  "--out", str(tmp_path / "ext.json")]) == 0
    ext = json.loads((tmp_path / "ext.json").read_text())
    assert [r["n"] for r in ext["rows"]] == [1, 5] and ext["rows"][0]["ratio_to_first"] == 1.0
    assert ext["rows"][1]["per_added_mask_s"] is not None and ext["rows"][1]["stages_median_s"]["clip_full"] > 0
    assert sam2_amg.main(["--mode", "short", "--out", str(tmp_path / "sam2.json")]) == 0
    amg = json.loads((tmp_path / "sam2.json").read_text())
    assert amg["reference"] == "sam_tiny" and set(amg["ratios"]) == {"sam2.1_tiny_test"}
    assert amg["amg"]["points_per_side"] == 4


def test_sam3_proposals_benchmark_runs_in_short_mode(tmp_path):
    """benchmarks/sam3_proposals.py on the tiny models: both proposal stages timed, candidate counts and ratios."""
    pytest.importorskip("sam3")
    from benchmarks import sam3_proposals

    assert sam3_proposals.main(["--mode", "short", "--out", str(tmp_path / "sam3.json")]) == 0
    data = json.loads((tmp_path / "sam3.json").read_text())
    assert data["automatic_s"] > 0 and data["concept_cold_s"] > 0 and data["ratio_cold"] > 0
    assert 0 < data["concept_candidates"] <= data["concept_max"] and data["automatic_candidates"] >= 0


def test_sdxl_capture_benchmark_runs_on_tiny_models(capsys):
    """benchmarks/sdxl_capture.py --tiny: both rows, their layer counts and grids, and the ratios."""
    from benchmarks import sdxl_capture

    out = sdxl_capture.main(["--tiny", "--dtype", "fp32", "--threads", "1"])
    sd2, sdxl = out["rows"]["sd2"], out["rows"]["sdxl"]
    assert sd2["map_grid"] == [2, 2] and sdxl["map_grid"] == [4, 4]  # latent / 4 at S = 64 and 128
    assert sdxl["layers_per_step"] == 12  # the tiny SDXL's factor-4 level: 3 + 3 + 2 x 3 transformers
    assert sd2["steps"] == sdxl["steps"] == 2 and all(t > 0 for t in sd2["step_s"] + sdxl["step_s"])
    assert out["ratios"]["s_per_step_sdxl_over_sd2"] > 0



def test_sdxl_unet_call_benchmark_runs_on_tiny_models(capsys):
    """benchmarks/sdxl_unet_call.py --tiny: plain and captured calls alternate, the capture records the factor-4
    layers, and in float32 the captured call's output equals the plain one's."""
    from benchmarks import sdxl_unet_call

    out = sdxl_unet_call.main(["--tiny", "--dtype", "fp32", "--threads", "1", "--rounds", "2"])
    assert len(out["plain_s"]) == len(out["captured_s"]) == 2
    assert out["captured_layers"] == 12  # the tiny SDXL's factor-4 level
    assert out["ratio_captured_over_plain"] > 0 and out["output_max_abs"] > 0
    assert out["output_max_abs_change"] == 0.0


def test_prompted_benchmark_compares_like_with_like(tmp_path):
    """benchmarks/prompted.py --mode short: the second sentence's proposal stage is divided by the automatic
    generator's second sentence (cached against cached), never by its cold run; both modes hand CLIP the same
    number of candidates; the automatic generator ran once for the two sentences."""
    from benchmarks import prompted

    pytest.importorskip("sam2")
    assert prompted.main(["--mode", "short", "--sam", "sam2.1_tiny", "--out", str(tmp_path / "p.json")]) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    auto, row = out["automatic"], out["prompted"]["sam2.1_tiny"]
    assert auto["second"]["proposals_s"] < auto["cold"]["proposals_s"]  # the masks were cached
    assert row["ratios"]["proposal_cached"] == pytest.approx(row["second"]["proposals_s"]
                                                             / auto["second"]["proposals_s"])
    assert row["ratios"]["proposal_cold"] == pytest.approx(row["cold"]["proposals_s"] / auto["cold"]["proposals_s"])
    assert row["ratios"]["end_to_end_cached"] == pytest.approx(row["second"]["wall_s"] / auto["second"]["wall_s"])
    for r in (auto, row):
        for sentence in ("cold", "second"):
            assert r[sentence]["clip_candidates"] == out["fixed_proposals"] == 10
    assert len(auto["sam_masks_returned"]) == 1 and len(row["prompted_masks_returned"]) == 2


def test_prompted_ratios_pair_each_sentence_with_the_same_sentence():
    from benchmarks.prompted import ratios

    auto = {"cold": {"proposals_s": 300.0, "wall_s": 340.0}, "second": {"proposals_s": 0.01, "wall_s": 30.0}}
    fast = {"cold": {"proposals_s": 6.0, "wall_s": 45.0}, "second": {"proposals_s": 0.3, "wall_s": 31.0}}
    q = ratios(auto, fast)
    assert q["proposal_cold"] == pytest.approx(0.02) and q["proposal_cached"] == pytest.approx(30.0)
    assert q["end_to_end_cold"] == pytest.approx(45 / 340) and q["end_to_end_cached"] == pytest.approx(31 / 30)
