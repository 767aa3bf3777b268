"""Load the CLIP model of the discriminative branch (docs/METHOD.md section 8) with open_clip: an open_clip
pretrained tag ("ViT-B-16/openai", fetched by open_clip's own download mechanism) or a local weight file.

Weight files are read safely: safetensors, or ``torch.load(weights_only=True)`` for .bin/.pt/.pth/.ckpt.
OpenAI's original release (``ViT-B-16.pt``) is a TorchScript archive; reading one runs TorchScript code
from the file, so it is refused unless ``allow_torchscript=True`` (only for files you trust).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .devices import parse_device, parse_dtype
from .discriminative import ClipScorer
from .errors import DependencyError, ModelLoadError

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_TAG = "openai"
DEFAULT_CLIP = f"{DEFAULT_CLIP_MODEL}/{DEFAULT_CLIP_TAG}"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# entries of OpenAI's TorchScript state dict that are not parameters
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


def _open_clip() -> Any:
    """The open_clip module, or DependencyError naming the package."""
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open_clip is a hard dependency
        raise DependencyError("CLIP scoring needs open_clip: pip install open_clip_torch") from exc
    return open_clip


def looks_like_path(source: str) -> bool:
    """True when a string names a file rather than an open_clip MODEL/TAG pair."""
    return (Path(source).suffix.lower() in WEIGHT_SUFFIXES or source.count("/") != 1 or "\\" in source
            or source.startswith((".", "~")))


def _missing_weights_hint(model_name: str, tag: str, cfg: dict[str, Any]) -> str:
    """Where to get and put the weights of an open_clip tag when they cannot be downloaded."""
    hub = str(cfg.get("hf_hub", "")).rstrip("/")
    where = []
    if hub:
        where.append(f"the Hugging Face repository {hub} (file open_clip_model.safetensors, kept by open_clip "
                     "in the Hugging Face cache: $HF_HOME/hub, by default ~/.cache/huggingface/hub)")
    if cfg.get("url"):
        where.append(f"{cfg['url']} (open_clip's URL cache: ~/.cache/clip)")
    return (f"Provide the weights of {model_name}/{tag}: download " + " or ".join(where) +
            " on a machine with network, then pass the file with --clip path/to/file (load_clip('path/to/file'))"
            " or copy it into that cache.")


def _from_tag(source: str, quick_gelu: bool | None, cache_dir: str | None) -> tuple[torch.nn.Module, str]:
    """An open_clip model with pretrained weights named "MODEL/TAG"; returns (model, model name)."""
    open_clip = _open_clip()
    model_name, tag = source.rsplit("/", 1)
    if model_name not in open_clip.list_models():
        raise ModelLoadError(f"CLIP source {source!r} is neither an existing weight file nor a known open_clip "
                             f"MODEL/TAG (unknown model {model_name!r}; e.g. {DEFAULT_CLIP!r})")
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ModelLoadError(f"open_clip has no pretrained tag {tag!r} for {model_name}; known tags: {tags}")
    gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    try:
        model = open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=gelu, quick_gelu=gelu,
                                       cache_dir=cache_dir, require_pretrained=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # download failures surface as RuntimeError / OSError / hub errors
        raise ModelLoadError(f"could not obtain the CLIP weights {source!r} ({exc}). "
                             + _missing_weights_hint(model_name, tag, cfg)) from exc
    return model, model_name


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip holding compiled code), as OpenAI's CLIP release."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] or name.endswith("/constants.pkl")
                   for name in archive.namelist())


def _read_file(path: Path, allow_torchscript: bool) -> Any:
    """The object stored in a weight file, read without unpickling arbitrary Python objects."""
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    if _is_torchscript(path):
        if not allow_torchscript:
            raise ModelLoadError(
                f"{path} is a TorchScript archive (OpenAI's original CLIP format); reading one runs code from "
                "the file. Use open_clip's safetensors copy of the weights (e.g. ViT-B-16/openai from "
                "timm/vit_base_patch16_clip_224.openai), or pass allow_torchscript=True for a file you trust.")
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise ModelLoadError(f"{path} could not be read as a TorchScript archive: {exc}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} could not be read as a plain state dict with torch.load(weights_only=True): {exc}. It may "
            "be a pickled model object or not a PyTorch file; save model.state_dict() (ideally as "
            ".safetensors) instead.") from exc


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...} / {"model": ...}, drop "module." prefixes and non-parameter entries."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"{path} holds no state dict (got {type(obj).__name__}); expected a mapping of "
                             "parameter names to tensors")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key in _NON_PARAMETER_KEYS:
        state.pop(key, None)
    return state


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    """ModelLoadError naming the file when the state dict does not fit the model exactly."""
    expected = model.state_dict()
    for key in {name for name, _ in model.named_buffers()} - set(expected):
        state.pop(key, None)  # non-persistent buffers (e.g. the text causal mask) are rebuilt by the model
    if "logit_scale" in state and "logit_scale" in expected and \
            state["logit_scale"].numel() == expected["logit_scale"].numel():
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if not (missing or unexpected or mismatched):
        return

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    problems = []
    if missing:
        problems.append(f"missing keys {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {listed(unexpected)}")
    if mismatched:
        problems.append("shape mismatch " + listed(
            [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]))
    raise ModelLoadError(f"{path}: expected an open_clip {model_name} state dict; " + "; ".join(problems)
                         + ". Pass model_name= (and model_cfg=) for another architecture.")


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building a model
    whose weights come from a file: the message would be false."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _from_file(path: Path, model_name: str, quick_gelu: bool | None, model_cfg: dict[str, Any] | None,
               allow_torchscript: bool) -> torch.nn.Module:
    """An open_clip model of architecture ``model_name`` with the weights of a local file."""
    open_clip = _open_clip()
    state = _state_dict(_read_file(path, allow_torchscript), path)
    cfg = copy.deepcopy(model_cfg or {})
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)  # a keyword argument beats the configuration files
    else:
        cfg.setdefault("quick_gelu", True)
    try:
        with _no_random_init_warning():  # the weights are loaded just below
            model = open_clip.create_model(model_name, pretrained=None, **cfg)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the open_clip architecture {model_name!r} for {path}: {exc}") from exc
    _check_keys(model, state, path, model_name)
    model.load_state_dict(state, strict=True)
    return model


def load_clip(source: str | Path | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | str | None = None, *, model_name: str = DEFAULT_CLIP_MODEL,
              quick_gelu: bool | None = None, model_cfg: dict[str, Any] | None = None,
              cache_dir: str | None = None, allow_torchscript: bool = False) -> ClipScorer:
    """Load CLIP for the discriminative branch as a ClipScorer.

    ``source``: None -> "ViT-B-16/openai" (OpenAI's weights, as the method uses); "MODEL/TAG" -> an
    open_clip pretrained tag (downloaded by open_clip into its cache); a local .safetensors/.bin/.pt/.pth
    file -> open_clip architecture ``model_name`` (``model_cfg`` overrides its configuration) with those
    weights. ``quick_gelu``: None -> the tag's setting, or True for files (OpenAI-trained weights need
    QuickGELU; pass False for LAION/DataComp-trained files). Bad or missing files raise ModelLoadError.
    """
    source = DEFAULT_CLIP if source is None else source
    text = str(source)
    path = Path(text).expanduser()
    open_clip = _open_clip()
    if path.is_file():
        model = _from_file(path, model_name, quick_gelu, model_cfg, allow_torchscript)
        tokenizer_name = model_name
    elif path.is_dir():
        raise ModelLoadError(f"CLIP source {path} is a folder; pass the weight file inside it "
                             f"(one of {', '.join(WEIGHT_SUFFIXES)})")
    elif isinstance(source, Path) or looks_like_path(text):
        raise ModelLoadError(f"CLIP weight file {path} not found; pass an existing {'/'.join(WEIGHT_SUFFIXES)} "
                             f"file or an open_clip MODEL/TAG such as {DEFAULT_CLIP!r}")
    else:
        model, tokenizer_name = _from_tag(text, quick_gelu, cache_dir)
    scorer = ClipScorer(model.eval(), open_clip.get_tokenizer(tokenizer_name))
    return scorer.to(device=parse_device(device), dtype=parse_dtype(dtype))


__all__ = ["load_clip", "looks_like_path", "ClipScorer", "DEFAULT_CLIP", "DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_TAG",
           "WEIGHT_SUFFIXES"]
