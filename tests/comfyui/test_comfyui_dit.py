"""Flux / SD 3 joint-attention capture on tiny random models of ComfyUI's own classes (tests/comfyui/dit_checks.py,
run in a subprocess; no server needed)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from comfy_helpers import COMFYUI_PATH, HERE, REPO, TIMINGS, child_env


def run_check(name: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "dit_checks.py"), str(REPO), name], cwd=COMFYUI_PATH,
                          env=child_env(), capture_output=True, text=True, timeout=900)
    TIMINGS[f"dit check {name}"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_capture_leaves_the_model_output_unchanged(family):
    r = run_check(f"{family}_transparent")
    assert r["diffs"]["attention"] == 0.0 and r["diffs"]["concept"] == 0.0
    assert r["diffs"]["attention_layers"] == ["step0/double_blocks.0", "step0/double_blocks.1"]
    assert r["options_equal"] and r["again"] == 0.0 and r["scale"] > 0


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_both_map_kinds_equal_plain_torch_by_hand(family):
    r = run_check(f"{family}_by_hand")
    assert r["attention_shape"] == [2, 3, 4, 7]  # 2 blocks, 3 x 4 token grid, 7 text tokens
    assert r["attention_diff"] < 1e-5 and r["concept_diff"] < 1e-5
    assert r["row_sums_below_one"] and not r["uncond"]
    assert 0.0 < r["concept_rows"] <= 1.0 + 1e-5  # two of three concepts in the text: their shares sum to <= 1
    if family == "sd3":  # CFG batch: the conditional rows were read, not the unconditional ones
        assert r["uncond_branch_diff"] > 1e-3


def test_root_word_maps_to_all_its_t5_pieces():
    """Positions by character offsets equal the pieces of ComfyUI's own T5 (and, for SD 3, CLIP-L) token ids."""
    r = run_check("positions")
    flux, sd3 = r["Flux"], r["SD3"]
    assert flux["root"] == sd3["root"] == "snowboarder"
    assert flux["root_positions"] == [1, 2] and flux["root_position"] == 2  # "▁snow", "boarder" after "▁the"
    assert flux["root_pieces"] == sd3["root_pieces"] == "snowboarder"
    assert flux["xylo_pieces"] == ["\u2581", "x", "y", "l", "o", "phon", "ist"]  # one word, seven T5 pieces
    assert sd3["root_positions"] == [2, 3, 78, 79] and sd3["root_position"] == 79  # CLIP-L pieces, 77 + T5
    assert sd3["clip_xylo"] == "xylophonist</w>" and flux["clip_positions"] == []


def test_other_families_are_refused_by_name():
    r = run_check("families")
    for name in ("SD15", "SDXL", "FluxInpaint"):
        assert f"this MODEL is {name}" in r[name]
    assert (r["flux"], r["schnell"], r["sd3"]) == ("Flux", "Flux", "SD3")
    supported = "SD 1.x/2.x and SDXL (UNet cross-attention), Flux.1 and SD 3 / 3.5 (joint attention)"
    for name in ("FluxInpaint", "AuraFlow"):  # the capture node names the bad input and every supported family
        assert r["node_" + name].startswith(f"model: the generative map runs on {supported}; this MODEL is {name}")
    assert "Flux is a diffusion transformer without UNet cross-attention" in r["unet_only_flux"]
    assert "RefDiffCaptureAttention and RefDiffSegment take it" in r["unet_only_flux"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_nodes_run_the_staged_graph_and_segment_on_a_dit(family):
    """The nodes' own execute methods on a tiny MODEL with the family's real text-encoder classes and tokenizers:
    parse in the model's context, capture (both map kinds), c, threshold proposals, s_G, selection; RefDiffSegment
    gives the same c and mask; the MODEL computes what it computed before; wrong inputs are refused by name."""
    r = run_check(f"{family}_nodes")
    name = "Flux" if family == "flux" else "SD3"
    assert r["parse_context"] == name and r["root"] == "snowboarder"
    assert r["root_positions"] == ([1, 2] if name == "Flux" else [2, 3, 78, 79])  # T5 (after CLIP-L's 77 in SD 3)
    assert r["latent_shape"] == [2, 16, 8, 8]
    for kind in ("attention", "concept"):
        k = r[kind]
        assert (k["type"], k["family"], k["kind"]) == ("JointAttentionBatch", name, kind)
        assert k["blocks"] == [1, 2] and k["layers"] == ["step0/double_blocks.1", "step0/double_blocks.2"]
        assert k["grid"] == [4, 4] and k["num_tokens"] == (256 if name == "Flux" else 154)
        assert k["info"].startswith(f"{name}: captured the joint-attention map '{kind}'")
        assert ("CFG 4.0" in k["info"]) == (name == "SD3")  # Flux: the conditional branch alone
        assert k["c_shape"] == [2, 48, 64] and k["c_dtype"] == "torch.float32"
        assert 0.0 <= k["c_range"][0] <= k["c_range"][1] <= 1.0
        assert k["batch_of_one_diff"] == 0.0  # an image's c does not depend on the batch it came in
        assert k["mask_shape"] == [2, 48, 64]
        assert k["segment_c_diff"] == 0.0 and k["segment_mask_diff"] == 0.0 and k["segment_report_has_family"]
    assert r["attention"]["concepts"] == []
    assert r["concept"]["concepts"] == ["snowboarder", "dog", "background", "floor", "wall", "sky"]
    assert r["attention"]["c_range"] == [0.0, 1.0] and r["attention"]["images_differ"] > 1e-3
    assert r["model_unchanged"] == 0.0 and r["options_unchanged"]
    emb = r["concept_embeddings"]  # each concept: its word encoded alone, T5's first token (SD 3: not CLIP's)
    assert emb["shape"] == [1, 2, 64 if name == "Flux" else 4096]
    assert emb["diff_to_t5"] < 1e-5 and emb["words_differ"] > 1e-4
    refused = r["refusals"]
    assert refused["sd_parse"].startswith("parse:") and f"connect the {name} CLIP" in refused["sd_parse"]
    assert refused["map_of_sd_parse"] == refused["sd_parse"]
    assert refused["logits"].startswith("kind:") and refused["self_attention"].startswith("self_attention:")
    assert refused["blocks"] == "blocks '7': this model has double blocks 0..2"
    assert refused["segment_factor"].startswith("factor:") and refused["refine"].startswith("attention:")
