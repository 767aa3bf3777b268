"""Restricted unpickling of the refer toolkit's ``refs(*).p`` files.

The refs files are pickles of plain lists, dicts, strings and numbers. They are read with an Unpickler that
resolves no global name except a few builtin container and number types, so a tampered file cannot run code:
it fails with InputError instead.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from ..errors import InputError

_ALLOWED = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool",
                      "complex"})
_BUILTIN_MODULES = frozenset({"builtins", "__builtin__"})


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that only builds builtin containers, strings and numbers; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle hook
        """Resolve only builtin plain-data types; refuse every other global."""
        if module in _BUILTIN_MODULES and name in _ALLOWED:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a refs pickle")


def safe_load_pickle(data: bytes, *, source: str = "pickle") -> Any:
    """Unpickle plain data (lists/dicts/str/numbers) only; Python 2 strings are decoded as UTF-8, else Latin-1."""
    last: Exception | None = None
    for encoding in ("utf-8", "latin1"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as exc:  # a Python 2 byte string that is not UTF-8
            last = exc
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as exc:
            raise InputError(f"{source}: not a plain-data refs pickle ({exc}); use the refer toolkit's "
                             "refs(unc).p / refs(umd).p / refs(google).p files") from exc
    raise InputError(f"{source}: cannot decode its strings ({last})")


def load_refs_pickle(path: str | Path) -> list[dict[str, Any]]:
    """Read a refer ``refs(*).p`` file with the restricted Unpickler and check it is a list of dicts."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read refs file {path}: {exc}") from exc
    refs = safe_load_pickle(data, source=str(path))
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise InputError(f"{path}: expected a list of ref dicts (refer toolkit format), got {type(refs).__name__}")
    return refs


__all__ = ["RestrictedUnpickler", "safe_load_pickle", "load_refs_pickle"]
