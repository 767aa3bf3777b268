"""The SEGS nodes inside ComfyUI's Python, run in a subprocess with ComfyUI's folder as working directory.

Usage: python segs_checks.py REPO_DIR [IMPACT_PACK_DIR]   -> prints one JSON object on the last line.

With IMPACT_PACK_DIR (a ComfyUI-Impact-Pack checkout whose core imports: OpenCV, scikit-image) Impact Pack's own
``impact.core`` is loaded: RefDiffToSEGS must then build Impact's SEG class, Impact's ``segs_to_combined_mask`` /
``segs_to_masklist`` must give back the selected and top-k masks, and the SEGS of Impact's ``mask_to_segs`` must
become the planted masks through RefDiffSEGSProposals. Without it the same checks run on the SEG namedtuple.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())
import utils.extra_config  # noqa: E402,F401  (as ComfyUI's main.py: its utils package before any other "utils")
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from comfy_helpers import library_on_path, load_pack  # noqa: E402

library_on_path()
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = sys.argv[1]
IMPACT = sys.argv[2] if len(sys.argv) > 2 else ""
H, W = 48, 64


def planted() -> torch.Tensor:
    m = torch.zeros(3, H, W, dtype=torch.bool)
    m[0, 5:15, 8:30] = True  # box [8, 5, 30, 15]
    m[1, 20:48, 40:64] = True  # at the bottom-right corner
    m[2, 30:34, 2:6] = True
    return m


def main() -> dict:
    import server  # noqa: F401  (loaded before custom nodes, as in ComfyUI)

    core = None
    if IMPACT:
        sys.path.append(os.path.join(IMPACT, "modules"))
        import impact.core as core  # noqa: F811
    pack = load_pack(REPO)
    segs_nodes = __import__(pack.__name__ + ".segs_nodes", fromlist=["x"])
    wire = __import__(pack.__name__ + ".wire_types", fromlist=["x"])
    out: dict = {"impact": core is not None}

    schema_to = segs_nodes.RefDiffToSEGS.GET_SCHEMA()
    schema_from = segs_nodes.RefDiffSEGSProposals.GET_SCHEMA()
    out["to_outputs"] = [o.get_io_type() for o in schema_to.outputs]
    out["from_inputs"] = [i.get_io_type() for i in schema_from.inputs]
    out["untooltipped"] = [i.id for s in (schema_to, schema_from) for i in s.inputs if not i.tooltip]
    out["validate_without_scores"] = segs_nodes.RefDiffToSEGS.validate_inputs(input_types={})
    out["validate_with_scores"] = segs_nodes.RefDiffToSEGS.validate_inputs(
        input_types={"discriminative": "REFDIFF_SCORES"})

    masks = planted()
    image = torch.rand(1, H, W, 3)
    proposals = wire.ProposalBatch([masks], source="sam")
    scores = wire.ScoreBatch([torch.tensor([0.2, 0.7, 0.5])], kind="discriminative", counts=[3])
    res = segs_nodes.RefDiffToSEGS.execute(proposals, image, "official", -1.0, -1.0, 2, -1, 3.0, "the cup",
                                           discriminative=scores).args
    segs, top = res[0], res[1]
    seg_type = type(segs[1][0])
    out["seg_is_impacts"] = core is not None and seg_type is core.SEG
    out["seg_fields"] = list(seg_type._fields)
    out["selected"] = [[s.bbox, s.label, round(float(s.confidence), 4)] for s in segs[1]]
    out["top"] = [[s.bbox, round(float(s.confidence), 4)] for s in top[1]]
    if core is not None:  # Impact Pack reads the SEGS back into masks
        combined = core.segs_to_combined_mask(segs)
        out["impact_combined_is_selected"] = bool(torch.equal(combined > 0.5, masks[1]))
        listed = core.segs_to_masklist(top)
        out["impact_masklist_is_top"] = bool(len(listed) == 2 and torch.equal(listed[0] > 0.5, masks[1])
                                             and torch.equal(listed[1] > 0.5, masks[2]))
        impact_segs = ((H, W), [seg for i in range(3) for seg in core.mask_to_segs(
            masks[i:i + 1].float().numpy(), True, 3.0, False, label=f"m{i}")[1]])
    else:
        seg = seg_type
        impact_segs = ((H, W), [seg(None, masks[i].float().numpy()[5:48, 0:64] if i else
                                    masks[0].float().numpy()[0:20, 0:40], 1.0,
                                    [0, 5, 64, 48] if i else [0, 0, 40, 20], None, f"m{i}") for i in range(3)])
    got = segs_nodes.RefDiffSEGSProposals.execute(impact_segs, image, "error", 0.5).args
    out["segs_proposals_equal"] = bool(torch.equal(got[0].masks[0], masks))
    out["segs_proposals_info"] = got[1]
    round_trip = segs_nodes.RefDiffSEGSProposals.execute(top, image, "error", 0.5).args[0]
    out["round_trip_top"] = bool(torch.equal(round_trip.masks[0], masks[[1, 2]]))
    try:
        segs_nodes.RefDiffSEGSProposals.execute(impact_segs, torch.rand(2, H, W, 3), "error", 0.5)
        out["batch_refused"] = ""
    except Exception as exc:  # noqa: BLE001
        out["batch_refused"] = f"{type(exc).__name__}: {exc}"
    two = wire.ProposalBatch([masks, masks], source="sam")
    try:
        segs_nodes.RefDiffToSEGS.execute(two, image, "official", -1.0, -1.0, 2, -1, 3.0, "",
                                         discriminative=wire.ScoreBatch([scores.scores[0]] * 2, "discriminative",
                                                                        [3, 3]))
        out["two_images_refused"] = ""
    except Exception as exc:  # noqa: BLE001
        out["two_images_refused"] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    result = main()
    print(json.dumps(result, default=lambda o: np.asarray(o).tolist()))
