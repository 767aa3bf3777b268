"""Offline CLIP tokenizer identical to Stable Diffusion 1.x's, built from the BPE vocabulary open_clip ships.

Stable Diffusion 1.x uses OpenAI's CLIP BPE (49,408 tokens). open_clip carries the same merges in
``bpe_simple_vocab_16e6.txt.gz``; this module turns them into the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads, so no download is ever needed.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DependencyError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48,894 merges, as in OpenAI's and open_clip's tokenizer
MODEL_MAX_LENGTH = 77
OPEN_CLIP_PAD_TOKEN = "!"  # id 0: OpenCLIP's padding (SD 2.x's text encoder and SDXL's CLIP-G were trained so)
_CACHE_VERSION = "clip-tokenizer-sd1-v1"
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character, as GPT-2/CLIP byte-level BPE does."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    """Path of open_clip's gzipped BPE merges file, found without importing open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("open_clip is needed for the CLIP vocabulary: pip install open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelLoadError(f"open_clip's BPE vocabulary {path} is missing: reinstall open_clip_torch")
    return path


def load_merges(bpe_path: str | Path | None = None) -> list[tuple[str, str]]:
    """Read the 48,894 CLIP merges (pairs of symbols) from open_clip's gzipped BPE file."""
    path = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as exc:
        raise ModelLoadError(f"cannot read the CLIP BPE file {path}: {exc}; reinstall open_clip_torch") from exc
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{path} does not hold {N_MERGES} CLIP merges: reinstall open_clip_torch")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: 256 byte symbols, the same with "</w>", the joined merges, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def _special(content: str) -> dict[str, object]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_clip_tokenizer_files(folder: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write SD 1.x's tokenizer (vocab.json, merges.txt, configs) into ``folder``; returns the folder.

    The folder has the diffusers ``tokenizer/`` layout, loadable by ``CLIPTokenizer.from_pretrained``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = load_merges()
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False, "bos_token": _special(BOS_TOKEN), "do_lower_case": True,
        "eos_token": _special(EOS_TOKEN), "errors": "replace", "model_max_length": int(model_max_length),
        "pad_token": EOS_TOKEN, "tokenizer_class": "CLIPTokenizer", "unk_token": _special(EOS_TOKEN),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {k: {kk: vv for kk, vv in _special(v).items() if kk != "__type"}
                for k, v in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", EOS_TOKEN))}
    specials["pad_token"] = EOS_TOKEN  # type: ignore[assignment]
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder


def cache_dir() -> Path:
    """refdiff's cache folder: $REFDIFF_CACHE_DIR, else $XDG_CACHE_HOME/refdiff, else ~/.cache/refdiff."""
    if os.environ.get("REFDIFF_CACHE_DIR"):
        return Path(os.environ["REFDIFF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refdiff"


def clip_tokenizer_folder() -> Path:
    """Folder holding the SD 1.x tokenizer files, written once into the cache (atomically, by rename)."""
    target = cache_dir() / _CACHE_VERSION
    if all((target / name).is_file() for name in _FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        write_clip_tokenizer_files(tmp)
        if target.exists() and not all((target / name).is_file() for name in _FILES):
            shutil.rmtree(target, ignore_errors=True)  # an incomplete folder left by an older writer
        try:
            os.replace(tmp, target)
        except OSError:
            if not all((target / name).is_file() for name in _FILES):  # another process did not win either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = MODEL_MAX_LENGTH, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
    """SD 1.x's CLIPTokenizer (pad = <|endoftext|>), loaded offline from the cached files; shared instance.

    ``pad_token=OPEN_CLIP_PAD_TOKEN`` gives the tokenizer of OpenCLIP encoders (SD 2.x, SDXL's CLIP-G): the same
    BPE and the same ids up to the end token, padded with id 0 instead of the end token."""
    try:
        from transformers import CLIPTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard requirement
        raise DependencyError("transformers is needed for the CLIP tokenizer: pip install transformers") from exc
    folder = clip_tokenizer_folder()
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=int(model_max_length),
                                            pad_token=pad_token, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {folder}: {exc}; delete that folder "
                             "so it is written again") from exc
    if len(tok) != VOCAB_SIZE:
        raise ModelLoadError(f"CLIP tokenizer in {folder} has {len(tok)} tokens, not {VOCAB_SIZE}; delete "
                             "that folder so it is written again")
    return tok
