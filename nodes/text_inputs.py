"""The nodes' text widgets read into values: one text per image, the per-image root-word and token overrides,
the UNet block list, the threshold list and the factor weights. No ComfyUI import (tested offline).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from refdiff.errors import InputError

from .wire_types import match_batch

FACTOR_WEIGHTS_EXAMPLE = "8:0.3,4:0.5,2:0.1,1:0.1"


def split_lines(text: str, name: str = "text") -> list[str]:
    """The non-empty lines of a multi-line text input; InputError naming the input when there are none."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{name} is empty: type a referring expression such as 'the dog on the left' "
                         "(one line for all images, or one line per image)")
    return lines


def texts_for_batch(text: str, batch: int, name: str = "text") -> list[str]:
    """One text per image: a single line serves the whole batch, otherwise one line per image."""
    return match_batch(split_lines(text, name), batch, name)


def overrides_for_batch(value: str, batch: int, name: str = "token_override") -> list[str]:
    """One token override per image: empty -> none; one line for every image; or one line per image (an
    empty line keeps that image's root)."""
    lines = [line.strip() for line in str(value or "").splitlines()]
    if not any(lines):
        return [""] * batch
    if len(lines) != batch:
        while lines and not lines[-1]:
            lines.pop()
    return match_batch(lines, batch, name)


def find_word(text: str, word: str, name: str = "root_word") -> tuple[int, int]:
    """Character span of the first whole-word, case-insensitive occurrence of ``word`` in ``text``."""
    word = word.strip()
    if not word or re.search(r"\s", word):
        raise InputError(f"{name} must be a single word of the text, got {word!r}")
    match = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"{name} {word!r} is not a whole word of the text {text!r}; leave {name} empty to "
                         "use the parser's root word, or pick a word that occurs in the text")
    return match.start(), match.end()


def parse_blocks(blocks: str) -> tuple[str, ...]:
    """"down,mid,up" (or input/middle/output, any separator) -> a tuple of block names."""
    names = tuple(b for b in re.split(r"[\s,;+/]+", str(blocks).strip().lower()) if b)
    if not names:
        raise InputError("blocks is empty; use e.g. 'down,mid,up'")
    return names


def parse_thresholds(text: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """"preset" -> default; otherwise numbers separated by commas or spaces, each in (0, 1]."""
    if not text.strip() or text.strip().lower() == "preset":
        return tuple(default)
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise InputError(f"thresholds: {text!r} is not a list of numbers such as '0.3, 0.5, 0.7'") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise InputError(f"thresholds: every value must lie in (0, 1], got {values}")
    return values


def parse_factor_weights(text: str, default: Sequence[tuple[int, float]] | Mapping[int, float] | None = None
                         ) -> dict[int, float]:
    """"8:0.3,4:0.5,2:0.1,1:0.1" -> {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}; "preset" (or empty) -> ``default``.

    Factors are powers of two >= 1 (the UNet level: latent side / grid side), weights finite and >= 0 with a
    positive sum; pairs are separated by commas, semicolons or spaces. InputError naming the bad entry.
    """
    name = "factor_weights"
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string such as {FACTOR_WEIGHTS_EXAMPLE!r}, got {type(text).__name__}")
    if not text.strip() or text.strip().lower() == "preset":
        if default is None:
            raise InputError(f"{name} is empty; give factor:weight pairs such as {FACTOR_WEIGHTS_EXAMPLE!r}")
        return {int(f): float(w) for f, w in (default.items() if isinstance(default, Mapping) else default)}
    out: dict[int, float] = {}
    for entry in (e for e in re.split(r"[\s,;]+", text.strip()) if e):
        parts = entry.split(":")
        if len(parts) != 2:
            raise InputError(f"{name}: {entry!r} is not a factor:weight pair; write e.g. {FACTOR_WEIGHTS_EXAMPLE!r}")
        try:
            factor, weight = int(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"{name}: {entry!r} must be an integer factor and a number, e.g. '4:0.5'") from None
        if factor < 1 or factor & (factor - 1):
            raise InputError(f"{name}: factor {parts[0]} in {entry!r} must be a power of two >= 1 (1, 2, 4, 8, ...: "
                             "latent side / attention grid side)")
        if not math.isfinite(weight) or weight < 0:
            raise InputError(f"{name}: weight {parts[1]} in {entry!r} must be a finite number >= 0")
        if factor in out:
            raise InputError(f"{name}: factor {factor} is given twice")
        out[factor] = weight
    if sum(out.values()) <= 0:
        raise InputError(f"{name}: the weights {out} sum to 0; give at least one positive weight")
    return out


def format_factor_weights(weights: Mapping[int, float]) -> str:
    """{8: 0.3, 4: 0.5} -> "8:0.3,4:0.5" (the widget's spelling)."""
    return ",".join(f"{int(f)}:{float(w):g}" for f, w in weights.items())


__all__ = ["FACTOR_WEIGHTS_EXAMPLE", "split_lines", "texts_for_batch", "overrides_for_batch", "find_word",
           "parse_blocks", "parse_thresholds", "parse_factor_weights", "format_factor_weights"]
