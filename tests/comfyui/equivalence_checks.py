"""The pack's nodes against the library, and in half precision, on ComfyUI's Python objects; run in a subprocess
with ComfyUI's folder as working directory (the nodes' execute() classmethods are called as ComfyUI calls them,
wired as a graph wires them, without a server).

Usage: python equivalence_checks.py MODELS_DIR REPO_DIR CHECK   -> prints one JSON object on the last line.

Checks:
- ``chain_equals_library``: for both presets and every variant, the chain of stage nodes (RefDiffParseText,
  RefDiffPrepareImage -> VAEEncode -> RefDiffNoiseInjection -> RefDiffCaptureAttention -> RefDiffGenerativeMap,
  the proposal node, RefDiffGenerativeScore / RefDiffCLIPScore -> RefDiffFuseSelect; G-refine through
  RefDiffSelfAttentionRefine, cluster through RefDiffFeatureClusterProposals) and the all-in-one RefDiffSegment,
  each compared with ``refdiff.RefDiff`` on the same files: the test checkpoint read by ``refdiff.sd.load_sd`` with
  a diffusers configuration of its small UNet (``library_config``), the same SAM and CLIP files, the same image,
  text and seed.
- ``half_precision``: the node chain of variants full and G with the MODEL in bf16 (computing in bf16), the CLIP
  scorer loaded by RefDiffCLIPLoader at precision bf16 and a bf16 SAM, against the same chain in float32.

Every comparison is made here with ``refdiff.testing.precision`` and reported (its numbers, and the message of a
failed comparison); the test asserts on the report.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())
from comfy_helpers import library_on_path  # noqa: E402  (this script's folder is on the path)

library_on_path()
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import numpy as np  # noqa: E402
import torch  # noqa: E402
from inprocess_checks import CKPT, load_pack, load_sd15  # noqa: E402  (same command line)

MODELS, CHECK = sys.argv[1], sys.argv[3]
SAM_FILE, CLIP_FILE = "refdiff_test_sam.pth", "refdiff_test_clip.safetensors"
TEXT = "the red box on the left"
SEED = 3
# 640 x 480: the area at which the official post-filter's sam_min_area (10000 px) is meant, so that its threshold
# is 10000 px whether a node scales it with the image area (as the library does) or not.
IMAGE_HW = (480, 640)
IMAGE_SIZE = 128  # the UNet's square: a 16 x 16 latent, the tiny UNet's factor-4 grid is 4 x 4
SAM_NODE = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)  # random SAM: no quality bar
# ComfyUI's VAEEncode takes the posterior mean (docs/NODES.md), so the library is told to do the same.
LIBRARY_SETTINGS = dict(image_size=IMAGE_SIZE, latent_from="mean", sam_points_per_side=4, sam_pred_iou_thresh=0.0,
                        sam_stability_score_thresh=0.0)
PRESETS = ("official", "paper")
VARIANTS = ("full", "G", "GS", "DS", "sam-clip", "G-refine", "cluster")
SEGMENT_VARIANTS = ("full", "G", "GS", "DS", "sam-clip")  # what RefDiffSegment offers
HALF_VARIANTS = ("full", "G")
HALF_PRECISIONS = ("bf16", "fp16")
# Boxes (y0, y1, x0, x1) of different places and sizes (no two of one area) that follow SAM's own masks wherever
# the library or a node asks refdiff.proposals.sam_proposals for them: the random-weight SAM gives one mask of
# ~1300 px here, which the official post-filter removes. 12 boxes above its 10000 px and 2 below, so that the
# filter's area threshold and its keep-the-10-largest rule both act.
PLANTED_BOXES = ((60, 300, 40, 260), (120, 420, 380, 600), (0, 480, 0, 320), (0, 200, 0, 640), (150, 330, 250, 450),
                 (320, 480, 100, 600), (0, 480, 300, 640), (200, 480, 0, 300), (40, 160, 420, 640),
                 (100, 380, 150, 330), (250, 460, 250, 520), (10, 110, 100, 250), (400, 460, 20, 120),
                 (30, 100, 500, 600))
# The library and the nodes run the same float32 code on the CPU except the UNet, VAE and text encoder (diffusers
# there, ComfyUI's own here): c may differ by summation order (measured ~1e-6), s_D only by summation order.
MAP_TOL = 1e-4
S_D_TOL = 1e-5


# ------------------------------------------------------------------------------------------------ helpers
def pack_modules() -> types.SimpleNamespace:
    """The pack's node modules, imported as ComfyUI imports the pack."""
    pack = load_pack()
    names = ("diffusion_nodes", "text_nodes", "map_nodes", "sam_nodes", "clip_nodes", "select_nodes", "segment_node",
             "refine_nodes", "cluster_nodes", "model_files", "wire_types")
    return types.SimpleNamespace(**{n: importlib.import_module(f"{pack.__name__}.{n}") for n in names})


def node_inputs(cls: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ComfyUI passes to ``cls.execute``: ``given``, and every other input's default (a
    combo's first option when it has none; a socket without default is left out). Names the schema lacks fail."""
    schema = cls.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise KeyError(f"{schema.node_id} has no input(s) {unknown}")
    out = {}
    for name, inp in inputs.items():
        if name in given:
            out[name] = given[name]
        elif getattr(inp, "default", None) is not None:
            out[name] = inp.default
        elif getattr(inp, "options", None):
            out[name] = inp.options[0]
    return out


def run_node(cls: Any, **given: Any) -> tuple:
    """The outputs of one node execution."""
    return tuple(cls.execute(**node_inputs(cls, given)).args)


@contextlib.contextmanager
def recording(module: Any, name: str) -> Iterator[list[dict[str, Any]]]:
    """Record the arguments (by name) and the result of every call of ``module.name`` (still called)."""
    original = getattr(module, name)
    signature = inspect.signature(original)
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls.append({**signature.bind(*args, **kwargs).arguments, "result": out})
        return out

    setattr(module, name, spy)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def planted_image() -> np.ndarray:
    """uint8 [480, 640, 3]: a red box on the left and a blue one on the right over dark noise."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 40, (*IMAGE_HW, 3), dtype=np.uint8)
    rgb[60:300, 40:260] = (200, 40, 40)
    rgb[120:420, 380:600] = (40, 40, 200)
    return rgb


def as_image(rgb: np.ndarray) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] in 0..1 (what LoadImage gives for this picture)."""
    return torch.from_numpy(rgb).float().div(255.0)[None]


def planted_proposals(height: int, width: int) -> torch.Tensor:
    """bool [len(PLANTED_BOXES), H, W]."""
    masks = torch.zeros(len(PLANTED_BOXES), height, width, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(PLANTED_BOXES):
        masks[i, y0:y1, x0:x1] = True
    return masks


@contextlib.contextmanager
def sam_masks_then_planted(m: types.SimpleNamespace) -> Iterator[list[int]]:
    """SAM's automatic masks followed by the planted boxes wherever refdiff.proposals.sam_proposals is called (the
    library's and the pack's SAM stages; SAM itself still runs). Yields the counts of SAM's own masks."""
    import refdiff.proposals as proposals_module

    original = proposals_module.sam_proposals
    counts: list[int] = []

    def with_planted(generator: Any, rgb: np.ndarray) -> torch.Tensor:
        masks = original(generator, rgb).cpu()
        counts.append(int(masks.shape[0]))
        return torch.cat([masks, planted_proposals(*rgb.shape[:2])])

    holders = [proposals_module] + [m.sam_nodes] * (getattr(m.sam_nodes, "sam_proposals", None) is original)
    for holder in holders:
        holder.sam_proposals = with_planted
    try:
        yield counts
    finally:
        for holder in holders:
            holder.sam_proposals = original


def library_config(folder: Path) -> Path:
    """A diffusers configuration folder of the test checkpoint: the bundled sd1 one (VAE, text encoder, scheduler
    of SD 1.5's sizes, as make_models writes them) with the UNet of make_models.SMALL_UNET."""
    from make_models import SMALL_UNET

    from refdiff.sd import bundled_config

    shutil.copytree(bundled_config("sd1"), folder)
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    attention = [depth > 0 for depth in SMALL_UNET["transformer_depth"]]
    config.update(block_out_channels=[SMALL_UNET["model_channels"] * m for m in SMALL_UNET["channel_mult"]],
                  layers_per_block=SMALL_UNET["num_res_blocks"][0], sample_size=SMALL_UNET["image_size"],
                  down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                  up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
                  attention_head_dim=SMALL_UNET["num_heads"])  # diffusers' legacy name for the head count
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


def register_model_folders(m: types.SimpleNamespace) -> None:
    """Point ComfyUI's models/sams and models/open_clip at the session's model files (as its YAML does)."""
    import folder_paths

    folder_paths.add_model_folder_path(m.model_files.SAM_FOLDER, os.path.join(MODELS, "sams"))
    folder_paths.add_model_folder_path(m.model_files.CLIP_FOLDER, os.path.join(MODELS, "open_clip"))


@contextlib.contextmanager
def scratch_folders() -> Iterator[str]:
    """ComfyUI's temp and output folders (previews, thumbnails) in a temporary folder."""
    import folder_paths

    with tempfile.TemporaryDirectory(prefix="refdiff_equiv_") as tmp:
        folder_paths.set_temp_directory(os.path.join(tmp, "temp"))
        folder_paths.set_output_directory(os.path.join(tmp, "output"))
        yield tmp


def outcome_of(mask: torch.Tensor, proposals: Any, s_g: Any, s_d: Any, selection: Any, c: torch.Tensor | None) -> Any:
    """One image's run of the nodes as a refdiff.testing.precision.Outcome."""
    from refdiff.testing.precision import Outcome

    def arr(scores: Any) -> np.ndarray | None:
        return None if scores is None else scores.scores[0].numpy()

    return Outcome(mask=mask[0].numpy() > 0.5, proposals=proposals.masks[0].numpy(),
                   scores={"generative": arr(s_g), "discriminative": arr(s_d), "fused": selection.fused[0].numpy()},
                   index=int(selection.indices[0]), attention=None if c is None else c[0].numpy())


def compare(ref: Any, got: Any, variant: str, preset: str, map_tol: float, s_d_tol: float, name: str) -> dict:
    """The deviations of ``got`` from ``ref`` and the verdict of refdiff.testing.precision's comparisons."""
    from refdiff.config import get_preset, get_variant
    from refdiff.scoring import fusion_weights
    from refdiff.testing.precision import (compare_same_proposals, compare_threshold_choice,
                                           compare_threshold_proposals)

    v, p = get_variant(variant), get_preset(preset)
    row: dict[str, Any] = {"n_ref": int(len(ref.proposals)), "n": int(len(got.proposals)), "index_ref": int(ref.index),
                           "index": int(got.index), "map_dev": 0.0}
    fused = np.sort(ref.scores["fused"])[::-1] if ref.scores["fused"] is not None else np.zeros(0)
    row["top2_gap"] = float(fused[0] - fused[1]) if len(fused) > 1 else None
    for key in ("generative", "discriminative", "fused"):
        a, b = ref.scores[key], got.scores[key]
        row[f"{key}_dev"] = (float(np.abs(a - b).max(initial=0.0)) if a is not None and b is not None
                             and a.shape == b.shape else None)
    try:
        if (ref.attention is None) != (got.attention is None):
            raise AssertionError(f"{name}: c computed by one side only")
        if ref.attention is not None:
            row["map_dev"] = map_dev = float(np.abs(got.attention - ref.attention).max())
            if map_dev > map_tol:
                raise AssertionError(f"{name}: c differs by {map_dev:.3g} > {map_tol:.3g}")
        if v.proposals == "threshold":
            compare_threshold_proposals(ref, got, p.thresholds, row["map_dev"], name=name)
            row["decided"] = compare_threshold_choice(ref, got, p.thresholds, row["map_dev"], name=name)
        else:
            row["decided"] = compare_same_proposals(ref, got, fusion_weights(p, v.generative and v.discriminative),
                                                    row["map_dev"], s_d_tol, name=name)
    except AssertionError as exc:
        row["error"] = str(exc)[:2000]
    return row


# ------------------------------------------------------------------------------------------------ node graphs
class Chain:
    """The stage nodes of one preset wired as a graph on one image; outputs computed on first use and kept, as
    ComfyUI's cache keeps a node's outputs for every consumer. Inputs a graph leaves alone keep their defaults
    (which must give the preset's values); set are the preset, the seed, the square's size, SAM's settings for a
    random-weight SAM, and what the G-refine capture needs (every level, self-attention)."""

    def __init__(self, m: types.SimpleNamespace, models: dict[str, Any], image: torch.Tensor, preset: str,
                 text: str = TEXT) -> None:
        self.m, self.models, self.image, self.preset, self.text = m, models, image, preset, text
        self._done: dict[str, Any] = {}
        self.outputs: list[tuple[str, tuple]] = []  # (node, its outputs) of every execution, for the dtype checks
        self.seconds: dict[str, float] = {}  # node -> seconds spent in it

    def _once(self, key: str, make: Any) -> Any:
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def _node(self, key: str, cls: Any, **given: Any) -> tuple:
        start = time.perf_counter()
        out = run_node(cls, **given)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        self.outputs.append((key, out))
        return out

    @property
    def parse(self) -> Any:
        return self._once("parse", lambda: self._node("ParseText", self.m.text_nodes.RefDiffParseText,
                                                      text=self.text, preset=self.preset,
                                                      clip=self.models["clip"])[0])

    @property
    def latent(self) -> dict:
        def make() -> dict:
            import nodes as comfy_nodes  # ComfyUI's core nodes (VAEEncode)

            square = self._node("PrepareImage", self.m.diffusion_nodes.RefDiffPrepareImage, image=self.image,
                                size=IMAGE_SIZE)[0]
            return comfy_nodes.VAEEncode().encode(self.models["vae"], square)[0]
        return self._once("latent", make)

    @property
    def noised(self) -> dict:
        return self._once("noised", lambda: self._node(
            "NoiseInjection", self.m.diffusion_nodes.RefDiffNoiseInjection, latent=self.latent, seed=SEED,
            preset=self.preset)[0])

    def _capture(self, key: str, **extra: Any) -> Any:
        return self._once(key, lambda: self._node(
            key, self.m.diffusion_nodes.RefDiffCaptureAttention, model=self.models["model"], latent=self.noised,
            preset=self.preset, clip=self.models["clip"], parse=self.parse, **extra)[0])

    @property
    def c(self) -> torch.Tensor:
        return self._once("c", lambda: self._node(
            "GenerativeMap", self.m.map_nodes.RefDiffGenerativeMap, attention=self._capture("CaptureAttention"),
            parse=self.parse, image=self.image, preset=self.preset)[0])

    @property
    def refined_c(self) -> torch.Tensor:
        attention = self._capture("CaptureAttention (self-attention)", factor=0, self_attention=True)
        return self._once("refined_c", lambda: self._node(
            "SelfAttentionRefine", self.m.refine_nodes.RefDiffSelfAttentionRefine, attention=attention,
            parse=self.parse, image=self.image, preset=self.preset)[0])

    @property
    def sam_proposals(self) -> Any:
        return self._once("sam", lambda: self._node(
            "SAMProposals", self.m.sam_nodes.RefDiffSAMProposals, sam=self.models["sam"], image=self.image,
            preset=self.preset, **SAM_NODE)[0])

    @property
    def cluster_proposals(self) -> Any:
        return self._once("cluster", lambda: self._node(
            "FeatureClusterProposals", self.m.cluster_nodes.RefDiffFeatureClusterProposals,
            model=self.models["model"], latent=self.latent, image=self.image, seed=SEED, clip=self.models["clip"])[0])

    def threshold(self, c: torch.Tensor) -> Any:
        return self._node("ThresholdProposals", self.m.map_nodes.RefDiffThresholdProposals, c=c,
                          preset=self.preset)[0]

    def variant(self, variant: str, proposals: Any = None) -> Any:
        """The Outcome of one variant (``proposals``: score these instead of the variant's own)."""
        from refdiff.config import get_variant

        v = get_variant(variant)
        c = (self.refined_c if v.refine else self.c) if v.needs_diffusion else None
        if proposals is None:
            proposals = {"threshold": lambda: self.threshold(c), "sam": lambda: self.sam_proposals,
                         "cluster": lambda: self.cluster_proposals}[v.proposals]()
        s_g = (self._node("GenerativeScore", self.m.map_nodes.RefDiffGenerativeScore, c=c, proposals=proposals,
                          preset=self.preset)[0] if v.generative else None)
        s_d = (self._node("CLIPScore", self.m.clip_nodes.RefDiffCLIPScore, clip_scorer=self.models["clip_scorer"],
                          image=self.image, proposals=proposals, parse=self.parse, preset=self.preset,
                          mode="sam-clip" if v.sam_clip else "ref-diff")[0] if v.discriminative else None)
        with recording(self.m.select_nodes, "fuse_select") as calls:
            mask = self._node("FuseSelect", self.m.select_nodes.RefDiffFuseSelect, proposals=proposals,
                              preset=self.preset, generative=s_g, discriminative=s_d, image=self.image)[0]
        return outcome_of(mask, proposals, s_g, s_d, calls[-1]["result"], c)


def segment_outcome(m: types.SimpleNamespace, models: dict[str, Any], image: torch.Tensor, preset: str,
                    variant: str) -> Any:
    """The Outcome of RefDiffSegment; its proposals and scores are the ones it hands to fuse_select."""
    from refdiff.config import get_variant

    with recording(m.select_nodes, "fuse_select") as calls:
        mask, c = run_node(m.segment_node.RefDiffSegment, model=models["model"], clip=models["clip"],
                           vae=models["vae"], image=image, text=TEXT, variant=variant, preset=preset, seed=SEED,
                           image_size=IMAGE_SIZE, sam=models["sam"], clip_scorer=models["clip_scorer"],
                           **SAM_NODE)[:2]
    call = calls[-1]
    return outcome_of(mask, call["proposals"], call["generative"], call["discriminative"], call["result"],
                      c if get_variant(variant).needs_diffusion else None)


def comfy_models(m: types.SimpleNamespace, precision: str = "fp32") -> dict[str, Any]:
    """MODEL, CLIP, VAE of the test checkpoint and the pack's SAM / CLIP loaders' outputs."""
    model, clip, vae = load_sd15()
    sam = run_node(m.sam_nodes.RefDiffSAMLoader, sam_name=SAM_FILE)[0]
    clip_scorer = run_node(m.clip_nodes.RefDiffCLIPLoader, clip_name=CLIP_FILE, precision=precision)[0]
    return {"model": model, "clip": clip, "vae": vae, "sam": sam, "clip_scorer": clip_scorer}


def library_models() -> tuple[Any, Any, Any]:
    """The library's (SDComponents, Sam, ClipScorer) of the same files as comfy_models, in float32 on the CPU."""
    from refdiff.clip import load_clip
    from refdiff.sam import load_sam
    from refdiff.sd import load_sd
    from refdiff.testing.clip import TINY_CLIP_BASE, TINY_CLIP_CONFIG

    with tempfile.TemporaryDirectory(prefix="refdiff_config_") as tmp:
        config = library_config(Path(tmp) / "config")
        sd = load_sd(CKPT, config=config, device="cpu", dtype="fp32")
    sam = load_sam(os.path.join(MODELS, "sams", SAM_FILE), device="cpu")
    scorer = load_clip(os.path.join(MODELS, "open_clip", CLIP_FILE), device="cpu", dtype="fp32",
                       model_name=TINY_CLIP_BASE, model_cfg=TINY_CLIP_CONFIG)
    return sd, sam, scorer


# ------------------------------------------------------------------------------------------------ checks
def check_chain_equals_library() -> dict:
    from refdiff.pipeline import RefDiff

    m = pack_modules()
    register_model_folders(m)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    models = comfy_models(m)
    rgb = planted_image()
    image = as_image(rgb)
    sd, sam, scorer = library_models()
    timings["load models"] = time.perf_counter() - start
    rows: dict[str, dict] = {}
    with scratch_folders(), sam_masks_then_planted(m) as sam_counts:
        for preset in PRESETS:
            start = time.perf_counter()
            library = RefDiff(sd=sd, sam=sam, clip=scorer, preset=preset, **LIBRARY_SETTINGS)
            results = library.segment_variants(rgb, TEXT, VARIANTS, seed=SEED)
            timings[f"{preset}: library"] = time.perf_counter() - start
            start = time.perf_counter()
            chain = Chain(m, models, image, preset)
            for variant in VARIANTS:
                name = f"{preset}/chain/{variant}"
                rows[name] = compare(results[variant], chain.variant(variant), variant, preset, MAP_TOL, S_D_TOL,
                                     name)
            timings[f"{preset}: node chain"] = time.perf_counter() - start
            start = time.perf_counter()
            for variant in SEGMENT_VARIANTS:
                name = f"{preset}/segment/{variant}"
                rows[name] = compare(results[variant], segment_outcome(m, models, image, preset, variant), variant,
                                     preset, MAP_TOL, S_D_TOL, name)
            timings[f"{preset}: RefDiffSegment"] = time.perf_counter() - start
    return {"rows": rows, "timings": timings, "unet": list(sd.unet.config.block_out_channels),
            "sam_masks": sam_counts}


def half_model(dtype: torch.dtype) -> Any:
    """The test checkpoint's MODEL with its UNet weights in ``dtype`` and computing in ``dtype``, as ComfyUI runs
    it on a GPU that supports the dtype (on a CPU ComfyUI would keep the weights in ``dtype`` but compute in
    float32: its unet_manual_cast is told here that the device supports it)."""
    import comfy.model_management as mm
    import comfy.sd

    original = mm.unet_manual_cast
    mm.unet_manual_cast = lambda *args, **kwargs: None
    try:
        return comfy.sd.load_checkpoint_guess_config(CKPT, output_vae=False, output_clip=False,
                                                     model_options={"dtype": dtype})[0]
    finally:
        mm.unet_manual_cast = original


def carried_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a node output: an IMAGE / MASK itself, the scores of a REFDIFF_SCORES, the captured maps of a
    REFDIFF_ATTENTION."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "scores"):
        return list(value.scores)
    if hasattr(value, "maps"):
        return [t for maps in value.maps for t in (maps.cond, maps.uncond) if t is not None]
    return []


def output_report(outputs: list[tuple[str, tuple]]) -> list[list]:
    """[node, output slot, dtype, device, finite] of every tensor the nodes output (carried_tensors)."""
    rows = []
    for node, values in outputs:
        for slot, value in enumerate(values):
            for t in carried_tensors(value):
                if isinstance(t, torch.Tensor):
                    rows.append([node, slot, str(t.dtype), str(t.device), bool(torch.isfinite(t).all())])
    return rows


def check_half_precision() -> dict:
    import copy

    from refdiff.testing.precision import MAP_TOL_U, S_D_TOL_U, UNIT_ROUNDOFF

    m = pack_modules()
    register_model_folders(m)
    ref_models = comfy_models(m)
    image = as_image(planted_image())
    rows: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    timings: dict[str, float] = {}
    models_info: dict[str, dict] = {}
    half_sam: dict[str, dict] = {}
    with scratch_folders(), sam_masks_then_planted(m):
        for name in HALF_PRECISIONS:
            start = time.perf_counter()
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
            u = UNIT_ROUNDOFF[dtype]
            sam = ref_models["sam"]
            half = {**ref_models, "model": half_model(dtype),
                    "clip_scorer": run_node(m.clip_nodes.RefDiffCLIPLoader, clip_name=CLIP_FILE, precision=name)[0],
                    "sam": m.wire_types.SamHandle(model=copy.deepcopy(sam.model).to(dtype), model_type=sam.model_type,
                                                  path=sam.path)}
            dm = half["model"].model
            models_info[name] = {
                "unet": sorted({str(p.dtype) for p in dm.diffusion_model.parameters()}),
                "compute": str(dm.manual_cast_dtype or dm.get_dtype()),
                "clip_scorer": sorted({str(p.dtype) for p in half["clip_scorer"].scorer.model.parameters()}),
                "sam": sorted({str(p.dtype) for p in half["sam"].model.parameters()})}
            timings[f"{name}: load"] = time.perf_counter() - start
            for preset in PRESETS:
                start = time.perf_counter()
                ref, other = Chain(m, ref_models, image, preset), Chain(m, half, image, preset)
                for variant in HALF_VARIANTS:
                    key = f"{name}/{preset}/{variant}"
                    # the fp32 run's SAM proposals are scored in both runs; the half SAM's are checked apart
                    proposals = ref.sam_proposals if variant == "full" else None
                    rows[key] = compare(ref.variant(variant), other.variant(variant, proposals=proposals), variant,
                                        preset, MAP_TOL_U * u, S_D_TOL_U * u, key)
                masks = other.sam_proposals.masks[0]
                half_sam[f"{name}/{preset}"] = {"dtype": str(masks.dtype), "shape": list(masks.shape),
                                                "same_as_fp32": bool(torch.equal(masks, ref.sam_proposals.masks[0]))}
                outputs[f"{name}/{preset}"] = output_report(other.outputs)
                timings[f"{name}: {preset}"] = time.perf_counter() - start
                timings.update({f"{name}: {preset}: {node}": t for node, t in other.seconds.items() if t > 1.0})
    return {"rows": rows, "outputs": outputs, "models": models_info, "half_sam": half_sam, "timings": timings}


def main() -> None:
    result = {"chain_equals_library": check_chain_equals_library, "half_precision": check_half_precision}[CHECK]()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
