"""RefDiffSpatial between scoring and selection in a real ComfyUI (tests/comfyui/spatial_checks.py runs the node
graph in process, in a subprocess, with the random-weight test models; the tests assert on its report).

On the planted boxes of equivalence_checks, "the second box from the left": every term off selects what
RefDiffFuseSelect selects without the node (the ablation is a rewiring); the defaults add the ordinal term to the
second pool member by box centre from the left and select it. "the box next to the blue box": the relation term
read from the same capture and the negatives from the CLIP model change the scores of the pool only, and the
fusion node's table and gallery show each term's contribution. "the red box without the blue square" with a CLIP
connected everywhere: variants full, G and GS give refdiff.RefDiff's scores and selection through the staged graph
with RefDiffSpatial and through RefDiffSegment under preset plus, and the negative term (the other noun's CLIP
similarity) enters full only, on all three paths (refdiff.spatial.negatives_apply).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env

from refdiff.config import PLUS


@pytest.fixture(scope="module")
def full_report(comfy_env) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "spatial_checks.py"), str(comfy_env.models), str(REPO),
                           "spatial"], cwd=COMFYUI_PATH, env=child_env(), capture_output=True, text=True,
                          timeout=1200)
    TIMINGS["spatial check"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(full_report) -> dict:
    return full_report["rows"]


@pytest.mark.parametrize("path", ["staged", "segment"])
@pytest.mark.parametrize("variant", ["full", "G", "GS"])
def test_negatives_follow_one_rule_on_every_path(full_report, variant, path):
    """With a CLIP scorer connected, the nodes' scores and selection are RefDiff's; the other noun's CLIP
    similarity is subtracted only where the scores hold s_D (full), never in G or GS."""
    row = full_report["negatives"][f"{path}/{variant}"]
    assert "error" not in row, row["error"]
    assert row["n"] == row["n_ref"] > 0, row
    assert row["decided"] and row["index"] == row["index_ref"], row
    assert row["negatives"] == row["negatives_ref"] == (variant == "full"), row


def _centre_x(box: list[int]) -> float:
    return (box[1] + box[3]) / 2


@pytest.mark.parametrize("text", ["ordinal", "relation"])
def test_every_term_off_is_the_graph_without_the_node(report, text):
    row = report[text]
    assert row["n"] >= 5
    assert row["direct_equals_off"] and row["off_index"] == row["direct_index"] >= 0
    assert row["off_total"] == row["base"]  # the fused score, unchanged
    assert "applied: no term" in row["off_info"]


def test_second_from_the_left_selects_the_second_pool_member(report):
    row = report["ordinal"]
    pool = row["pool"]
    assert 2 <= len(pool) <= PLUS.spatial_pool  # the instances: within the margin of the best one
    assert max(row["base"][i] for i in pool) - min(row["base"][i] for i in pool) <= PLUS.spatial_pool_margin
    second = sorted(pool, key=lambda i: _centre_x(row["boxes"][i]))[1]
    assert second != row["direct_index"]  # the words change the choice
    assert row["on_index"] == second
    assert list(row["contributions"]) == ["ordinals"]
    bonus = PLUS.spatial_ordinal_weight * PLUS.spatial_pool_margin  # one-hot, in units of the margin
    assert row["contributions"]["ordinals"] == pytest.approx([bonus if i == second else 0.0 for i in range(row["n"])])
    assert row["on_total"] == pytest.approx([b + o for b, o in zip(row["base"], row["contributions"]["ordinals"])])
    assert "ordinal 'second' (side left, order 2)" in row["info"]
    assert row["mask_dtype"] == "torch.float32" and row["mask_shape"] == [1, 480, 640]


def test_relation_and_negatives_come_from_the_capture_and_the_clip(report):
    row = report["relation"]
    assert "near 'box' ('next to')" in row["info"]
    terms = row["contributions"]
    assert set(terms) == {"relations", "negatives"}
    outside = [i for i in range(row["n"]) if i not in row["pool"]]
    assert all(terms["relations"][i] == 0.0 for i in outside)
    assert any(terms["relations"][i] > 0.0 for i in row["pool"])
    top = PLUS.spatial_relation_weight * PLUS.spatial_pool_margin  # the weight in margins times a value in [0, 1]
    assert all(0.0 <= v <= top + 1e-7 for v in terms["relations"])
    total = [b + sum(t[i] for t in terms.values()) for i, b in enumerate(row["base"])]
    assert row["on_total"] == pytest.approx(total)
    assert row["on_index"] == max(range(row["n"]), key=lambda i: row["on_total"][i])


@pytest.mark.parametrize("text", ["ordinal", "relation"])
def test_table_and_gallery_show_each_terms_contribution(report, text):
    row = report[text]
    names = list(row["contributions"])
    assert row["gallery_spatial"] == names and not row["direct_gallery_has_terms"]
    for item in row["gallery_items"]:
        i = item["index"]
        assert item["base"] == pytest.approx(row["base"][i])
        assert item["terms"] == pytest.approx({k: row["contributions"][k][i] for k in names})
        assert item["fused"] == pytest.approx(row["on_total"][i])
    first = row["table"].splitlines()[1]
    assert first.startswith(f"  #1 proposal {row['on_index']},") and first.endswith("<- selected")
    assert all(f"{k} " in first for k in ["base", *names])


@pytest.mark.parametrize("text", ["ordinal", "relation"])
def test_segment_under_plus_applies_the_same_terms(report, text):
    """RefDiffSegment with preset plus (automatic SAM kept) ranks by the fused score plus the terms, exactly as
    the staged graph through RefDiffSpatial at its defaults, and its report says so."""
    row = report[text]
    assert row["segment_total"] == pytest.approx(row["on_total"], abs=1e-5)
    assert row["segment_index"] == row["on_index"] >= 0
    assert "spatial terms (beyond the paper)" in row["segment_report"]
