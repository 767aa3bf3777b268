"""Per-sentence result files (JSON lines), the run manifest, and reading them back for resume and merge.

A results folder holds ``run.json`` (what was evaluated) and ``results.jsonl`` (one process) or
``results.rank{r}.jsonl`` (shards). Each line is one (sentence, variant): a result with ``iou`` or an error
with ``error``. Reading keeps one line per key: a result wins over errors; the first result wins over later
duplicates.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

MANIFEST = "run.json"
# manifest fields that must agree for two runs to share a results folder
CONFIG_KEYS = ("dataset", "split", "split_by", "text", "preset", "overrides", "seed", "sd", "sd_config", "sam",
               "clip", "dtype")
Key = tuple[str, str, str]


def record_key(record: dict[str, Any]) -> Key:
    """(ref_id, sent_id, variant) of a line, as strings."""
    return (str(record.get("ref_id")), str(record.get("sent_id")), str(record.get("variant")))


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rank_file(out_dir: Path, rank: int, world_size: int) -> Path:
    """results.jsonl for a single process, results.rank{r}.jsonl for a shard."""
    return out_dir / ("results.jsonl" if world_size <= 1 else f"results.rank{rank}.jsonl")


def result_files(out_dir: Path) -> list[Path]:
    """All result files of a folder (single-process and shard files), sorted by name."""
    return sorted(p for p in out_dir.glob("results*.jsonl") if p.is_file())


def iter_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed lines of a JSONL file; an unparsable line (a write cut by a crash) is skipped."""
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def read_records(paths: Iterable[Path]) -> dict[Key, dict[str, Any]]:
    """One line per (ref_id, sent_id, variant): the first result if any, else the last error."""
    out: dict[Key, dict[str, Any]] = {}
    for path in paths:
        for record in iter_lines(path):
            key = record_key(record)
            old = out.get(key)
            if old is None or "error" in old:
                out[key] = record
    return out


def done_keys(out_dir: Path) -> set[Key]:
    """Keys with a result (not an error) in any result file of the folder: what --resume skips."""
    return {k for k, r in read_records(result_files(out_dir)).items() if "error" not in r}


def truncate_partial_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline, so appending starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


class RecordWriter:
    """Appends JSON lines to a file and flushes each one, so an interrupted run loses nothing written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_partial_line(path)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the operating system."""
        self._fh.write(json.dumps(jsonable(record), ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Flush to disk and close."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The run.json of a results folder, or None when there is none."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); remove it or use another results folder") from exc


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write run.json atomically (several shards may write the same content at once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(jsonable(manifest), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)


def check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder whose results come from a different configuration (dataset, split, preset, models...)."""
    old = read_manifest(out_dir)
    if old is None or not any(p.stat().st_size > 0 for p in result_files(out_dir)):
        return
    diff = [k for k in CONFIG_KEYS if jsonable(old.get(k)) != jsonable(manifest.get(k))]
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
        raise InputError(f"results folder {out_dir} holds a different evaluation ({detail}); "
                         "choose another -o folder")


__all__ = ["MANIFEST", "CONFIG_KEYS", "record_key", "jsonable", "rank_file", "result_files", "iter_lines",
           "read_records", "done_keys", "truncate_partial_line", "RecordWriter", "read_manifest",
           "write_manifest", "check_manifest"]
