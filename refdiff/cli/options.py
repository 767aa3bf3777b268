"""The options `refdiff segment` and `refdiff eval` share (models, device, preset, --set) and the checks they
run on them before any model loads, so a misspelt file or field fails in a second, not after Stable Diffusion.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..config import PRESETS, Preset, get_preset
from ..downloads import SAM_DOWNLOAD_NOTE
from ..errors import InputError, ModelLoadError, RefDiffError

DEFAULT_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # as refdiff.sd.DEFAULT_SOURCE (kept torch-free)
DEFAULT_CLIP = "ViT-B-16/openai"  # as refdiff.clip.DEFAULT_CLIP
SET_EXAMPLE = "--set sam_points_per_side=16"
_NONE_SPELLINGS = ("null", "none")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless the help already states its default or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------ options
def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that runs the method: preset, speed, models, device, offload, --set."""
    parser.add_argument("--preset", default="official", choices=sorted(PRESETS),
                        help="official: the authors' released code with its bugs fixed; paper: the equations as "
                             "written; plus: official with the spatial terms and prompted SAM; fast: official at "
                             "S = 512, one conditional UNet step and prompted SAM (pair it with a SAM 2.1 tiny "
                             "checkpoint) (default: official)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VAE sample and the injected noise (default: 0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side S of the square fed to Stable Diffusion (default: the preset's, 1024, which "
                             "is also SDXL's training resolution); 512 is about 4x faster and changes results "
                             "(SDXL below 1024 leaves its training resolution)")
    parser.add_argument("--proposal-mode", choices=("automatic", "prompted", "concept"), default=None,
                        help="how SAM proposals are made: automatic (SAM's automatic mask generator on a 32 x 32 point "
                             "grid, as the paper), prompted (SAM prompted at the peaks of the generative map c: "
                             "a few object-level masks, much faster, misses what c misses; beyond the paper) or "
                             "concept (SAM 3's instances of the target noun, needs --sam3; beyond the paper). "
                             "Same as --set proposal_mode=... (default: the preset's: automatic in official and paper, "
                             "prompted in plus, concept in plus when --sam3 is given)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override any preset field, e.g. {SET_EXAMPLE} or --set sam_min_area=0 (repeatable; "
                             "the value is read as JSON when it parses: numbers, true/false, null, [lists]; "
                             "the fields and their defaults are listed in docs/METHOD.md)")
    g = parser.add_argument_group("models (default: the published weights, downloaded once)")
    g.add_argument("--sd", metavar="PATH_OR_ID", default=None,
                   help="Stable Diffusion 1.x/2.x or SDXL base: a diffusers folder, a hub id, or a single "
                        ".safetensors/.ckpt checkpoint (e.g. ComfyUI's models/checkpoints/v1-5-pruned-emaonly"
                        ".safetensors or sd_xl_base_1.0.safetensors; the family is read from the weights, the "
                        "SDXL refiner is refused), or a local diffusers Flux.1 / SD 3 folder (joint-attention map, "
                        "docs/METHOD.md section 15). "
                        f"Default: {DEFAULT_SD}, downloaded to the Hugging Face cache")
    g.add_argument("--sd-config", metavar="NAME_OR_DIR", default=None,
                   help="configuration for a single-file checkpoint: sd1, sd2, sd2-v, sdxl, or a diffusers-layout "
                        "folder (default: detected from the weights)")
    g.add_argument("--vae", metavar="PATH", default=None,
                   help="replace the model's VAE: a diffusers VAE folder or a .safetensors VAE file, e.g. an "
                        "fp16-safe SDXL VAE such as madebyollin/sdxl-vae-fp16-fix (default: the model's own; "
                        "SDXL's own VAE encodes in float32 when --dtype is fp16, as it overflows fp16)")
    g.add_argument("--sam", metavar="FILE", default=None,
                   help="SAM checkpoint (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth) or SAM 2 / 2.1 "
                        "checkpoint (sam2.1_hiera_tiny/small/base_plus/large .pt or .safetensors; detected). "
                        f"Default: vit_h, downloaded once to {SAM_DOWNLOAD_NOTE}")
    g.add_argument("--sam3", metavar="FILE", default=None,
                   help="SAM 3 checkpoint (Meta's sam3.pt, or a .safetensors of the image model) for --proposal-mode "
                        "concept: its instances of the target noun become the proposals; needs the sam3 package "
                        "(README, SAM 3). Default: none (no SAM 3 is downloaded)")
    g.add_argument("--clip", metavar="TAG_OR_FILE", default=None,
                   help="CLIP scorer: an open_clip MODEL/TAG such as ViT-B-16/openai, or a local weights file. "
                        f"Default: {DEFAULT_CLIP}, downloaded by open_clip to its cache")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="model precision (default: fp16 on CUDA, fp32 on the CPU)")
    g.add_argument("--offload", action="store_true",
                   help="keep the models in CPU memory and move each one to --device only while its stage runs "
                        "(SD ~2 GB, SAM vit_h 2.5 GB, CLIP 0.6 GB): for 6-8 GB GPUs; every stage that is not "
                        "cached pays a host-to-device copy of its model; same results")


# ------------------------------------------------------------------------------------------------ --set
def parse_overrides(items: list[str]) -> dict[str, str]:
    """FIELD=VALUE strings to {FIELD: VALUE text}; InputError on an item without '=' or without a field."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected FIELD=VALUE, e.g. {SET_EXAMPLE}")
        out[key.strip()] = raw
    return out


def preset_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The preset fields the command line changes (--set, then --image-size), each checked against its type."""
    preset = get_preset(args.preset)
    hints = get_type_hints(Preset)
    out = {name: preset_value(preset, name, raw, hints) for name, raw in parse_overrides(args.overrides).items()}
    if args.image_size is not None:
        if out.get("image_size", args.image_size) != args.image_size:
            raise InputError(f"--image-size {args.image_size} and --set image_size={out['image_size']} disagree; "
                             "give one of them")
        out["image_size"] = args.image_size
    mode = getattr(args, "proposal_mode", None)
    if mode is not None:
        if out.get("proposal_mode", mode) != mode:
            raise InputError(f"--proposal-mode {mode} and --set proposal_mode={out['proposal_mode']} disagree; "
                             "give one of them")
        out["proposal_mode"] = mode
    return out


def preset_value(preset: Preset, name: str, raw: str, hints: dict[str, Any] | None = None) -> Any:
    """The value of ``--set name=raw`` as preset field ``name`` takes it; InputError names the field and the fix."""
    known = [f.name for f in fields(Preset)]
    if name == "name":
        raise InputError(f"--set name={raw}: the preset is chosen with --preset ({' or '.join(sorted(PRESETS))})")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "the fields are " + ", ".join(known[1:])
        raise InputError(f"--set {name}={raw}: there is no preset field {name!r}; {hint} (each field with its "
                         "meaning and default: docs/METHOD.md)")
    hint_type = (hints or get_type_hints(Preset))[name]
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    converted = _as_type(value, raw, hint_type)
    if converted is _BAD:
        default = json.dumps(getattr(preset, name))
        raise InputError(f"--set {name}={raw}: {name} takes {_describe(hint_type)}, e.g. --set {name}={default} "
                         f"(the {preset.name} preset's value)")
    return converted


_BAD = object()  # marks a value that does not fit a field's type


def _as_type(value: Any, raw: str | None, hint: Any) -> Any:
    """``value`` (JSON-parsed; ``raw`` its text, None inside lists) in the type ``hint``, or _BAD."""
    origin, members = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in members and (value is None or (raw or "").strip().lower() in _NONE_SPELLINGS):
            return None
        for member in members:
            if member is not type(None) and (found := _as_type(value, raw, member)) is not _BAD:
                return found
        return _BAD
    if origin is Literal:
        text = value if isinstance(value, str) else raw
        return text if text in members else _BAD
    if origin is tuple:
        if not isinstance(value, list):
            return _BAD
        each = [members[0]] * len(value) if len(members) == 2 and members[1] is Ellipsis else list(members)
        if len(each) != len(value):
            return _BAD
        items = [_as_type(v, None, h) for v, h in zip(value, each)]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _BAD
    if hint is str:
        return value if isinstance(value, str) else (raw if raw is not None else _BAD)
    return value


def _describe(hint: Any) -> str:
    """A type hint in words, for --set errors: 'an integer or null', "one of 'probs', 'logits'"."""
    origin, members = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(m) for m in members if m is not type(None)) + (
            " or null" if type(None) in members else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(m) for m in members)
    if origin is tuple:
        if len(members) == 2 and members[1] is Ellipsis:
            return f"a JSON list of {_PLURALS.get(members[0], 'lists')}"
        return f"a JSON list of {len(members)} items"
    return _WORDS.get(hint, str(hint))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


# ------------------------------------------------------------------------------------------------ checks
def check_model_options(args: argparse.Namespace, device: str | None = None) -> None:
    """Fail now, naming the option and the fix, on a model file that is not there or a device that is not
    available: the models load lazily, so without this a bad --sam would surface after SD ran.
    ``device`` is the compute device to check when it differs from --device (torchrun's per-rank one)."""
    from ..clip import WEIGHT_SUFFIXES, looks_like_path
    from ..sam import checkpoint_urls, model_type_from_name, sam_cache_dir
    from ..devices import resolve_device
    from ..sd import BUNDLED_CONFIGS, looks_like_hub_id

    if args.sam is not None and not Path(args.sam).expanduser().is_file():
        raise ModelLoadError(
            f"--sam {args.sam}: no such file. Pass the path of a SAM checkpoint (download "
            f"{checkpoint_urls(model_type_from_name(args.sam))}), or leave --sam out to download vit_h once "
            f"to {sam_cache_dir()}")
    if args.sd is not None:
        sd = Path(args.sd).expanduser()
        if sd.is_dir() and not (sd / "model_index.json").is_file():
            raise ModelLoadError(f"--sd {args.sd}: the folder has no model_index.json; pass a diffusers model "
                                 "folder (saved by save_pretrained), a single .safetensors/.ckpt checkpoint or a "
                                 f"hub id such as {DEFAULT_SD}")
        if not sd.exists() and not looks_like_hub_id(args.sd):
            raise ModelLoadError(f"--sd {args.sd}: no such file or folder, and not a hub id (OWNER/NAME); pass "
                                 "an existing .safetensors/.ckpt checkpoint, a diffusers folder (with "
                                 f"model_index.json) or a hub id such as {DEFAULT_SD}, or leave --sd out")
    vae = getattr(args, "vae", None)
    if vae is not None and not Path(vae).expanduser().exists():
        raise ModelLoadError(f"--vae {vae}: no such file or folder; pass a diffusers VAE folder (config.json and "
                             "weights) or a .safetensors VAE file, or leave --vae out to use the model's own VAE")
    config = args.sd_config
    if config is not None and config.strip().lower() not in BUNDLED_CONFIGS and not Path(config).expanduser().is_dir():
        raise InputError(f"--sd-config {config}: neither one of {', '.join(BUNDLED_CONFIGS)} nor an existing "
                         "diffusers-layout configuration folder")
    if args.clip is not None:
        clip = Path(args.clip).expanduser()
        if clip.is_dir():
            raise ModelLoadError(f"--clip {args.clip}: is a folder; pass the weight file inside it "
                                 f"({'/'.join(WEIGHT_SUFFIXES)})")
        if not clip.is_file() and looks_like_path(args.clip):
            raise ModelLoadError(f"--clip {args.clip}: no such file; pass an existing {'/'.join(WEIGHT_SUFFIXES)} "
                                 f"file or an open_clip MODEL/TAG such as {DEFAULT_CLIP}, or leave --clip out")
    check_sam3_options(args)
    compute = device if device is not None else args.device
    try:
        resolve_device(compute)
    except InputError as exc:
        raise InputError(f"--device {compute}: {exc}") from None


def check_sam3_options(args: argparse.Namespace) -> None:
    """--sam3 names an existing SAM 3 file (a SAM / SAM 2 file is refused by name, as a SAM 3 file given to
    --sam), and --proposal-mode concept has one; read from the file's keys only (no model is built)."""
    sam3 = getattr(args, "sam3", None)
    mode = getattr(args, "proposal_mode", None)
    sets_concept = any(item.replace(" ", "").startswith("proposal_mode=concept")
                       for item in getattr(args, "overrides", []) or [])
    if (mode == "concept" or sets_concept) and sam3 is None:
        raise InputError("--proposal-mode concept needs a SAM 3 checkpoint: add --sam3 FILE (Meta's sam3.pt or a "
                         ".safetensors of it), or choose --proposal-mode automatic or prompted")
    if sam3 is not None:
        from ..sam3_models import checkpoint_kind

        path = Path(sam3).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--sam3 {sam3}: no such file; pass Meta's sam3.pt or a .safetensors of the SAM 3 "
                                 "image model, or leave --sam3 out")
        found = checkpoint_kind(path)
        if found != "sam3":
            kind = {"sam2": "a SAM 2 checkpoint", "sam": "a SAM (v1, segment-anything) checkpoint"}.get(
                found, "not a SAM 3 checkpoint")
            raise ModelLoadError(f"--sam3 {sam3}: {kind}; --sam3 takes a SAM 3 model (sam3.pt), and SAM v1 / SAM 2 "
                                 "files go to --sam")
    if args.sam is not None and Path(args.sam).expanduser().is_file():
        from ..sam3_models import SAM3_REFUSAL, holds_sam3

        if holds_sam3(Path(args.sam).expanduser()):
            raise ModelLoadError(f"--sam {args.sam} {SAM3_REFUSAL}")


def report_error(prog: str, exc: RefDiffError) -> int:
    """Print ``prog: error: message`` to stderr; the exit status of a bad input or file (2)."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


__all__ = ["HelpFormatter", "add_shared_arguments", "parse_overrides", "preset_overrides", "preset_value",
           "check_model_options", "report_error", "DEFAULT_SD", "DEFAULT_CLIP"]
