"""The offline CLIP tokenizer must equal Stable Diffusion 1.x's (checked against open_clip's own tokenizer)."""
from __future__ import annotations

import json

import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from refdiff import tokenizer as rt

TEXTS = [
    "a photo of a cat",
    "the black horse jumping on the left",
    "A man standing next to the woman, holding 2 skateboards!",
    "zebras grazing near the top-left corner; it's 1984",
    "photographer's umbrella (red) & café",
]


@pytest.fixture(scope="module")
def oc_tok() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return rt.clip_tokenizer()


def test_vocab_size_and_specials(tok: CLIPTokenizer) -> None:
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    assert tok.model_max_length == 77


def test_known_ids_match_open_clip(tok: CLIPTokenizer, oc_tok: SimpleTokenizer) -> None:
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids == [oc_tok.sot_token_id, *oc_tok.encode("a photo of a cat"), oc_tok.eot_token_id]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_open_clip(tok: CLIPTokenizer, oc_tok: SimpleTokenizer, text: str) -> None:
    assert tok(text).input_ids[1:-1] == oc_tok.encode(text)


def test_padding_and_truncation_to_77(tok: CLIPTokenizer) -> None:
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[7:]) == {49407}
    long = tok(" ".join(["cat"] * 200), truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_vocab_equals_open_clip_encoder(tmp_path, oc_tok: SimpleTokenizer) -> None:
    folder = rt.write_clip_tokenizer_files(tmp_path / "tokenizer")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    expected = {t: i for t, i in oc_tok.encoder.items() if i < 49406}
    assert {t: i for t, i in vocab.items() if i < 49406} == expected
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    assert tuple(lines[1].split()) == next(iter(sorted(oc_tok.bpe_ranks, key=oc_tok.bpe_ranks.get)))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["tokenizer_class"] == "CLIPTokenizer"
    loaded = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert loaded.model_max_length == 77 and loaded.pad_token == "<|endoftext|>"
    assert loaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cache_folder_written_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    folder = rt.clip_tokenizer_folder()
    assert folder.parent == tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == sorted(rt._FILES)
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert rt.clip_tokenizer_folder() == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_cache_folder_repairs_incomplete(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFDIFF_CACHE_DIR", str(tmp_path))
    broken = tmp_path / rt._CACHE_VERSION
    broken.mkdir()
    (broken / "vocab.json").write_text("{}")
    folder = rt.clip_tokenizer_folder()
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408


def test_cache_dir_follows_xdg(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFDIFF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rt.cache_dir() == tmp_path / "refdiff"


def test_bytes_to_unicode_is_a_bijection() -> None:
    table = rt.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
