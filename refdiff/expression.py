"""A structured parse of a referring expression: the target, its attributes, its place in the frame and its
relations to the other objects named (docs/METHOD.md section 13, beyond the paper).

Only word forms that say where or how big the target is become terms; lexical exclusions keep idioms and
compounds out ("the left-handed pitcher", "the man who left", "the right answer", "a second helping",
"top hat", "big ben"). The parse is built on the spaCy parse of ``refdiff.text`` and its root word.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .text import DIRECTIONS, ParsedText, _DIRECTION_FORMS, _is_on_top_of, _is_verb_use, load_spacy, names_object, \
    parse_text, side_word_noun

SIDES = DIRECTIONS  # left, right, top, bottom
FRAME_KINDS = ("position", "middle", "ordinal", "size")
SIZE_MEASURES = ("area", "height", "width")
RELATION_FAMILIES = ("near", "behind", "front", "on", "under", "left_of", "right_of", "holding")

_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
             "eighth": 8, "ninth": 9, "tenth": 10, "1st": 1, "2nd": 2, "3rd": 3, "4th": 4, "5th": 5, "6th": 6}
# extreme positions: "leftmost" = first from the left
_EXTREMES = {"leftmost": "left", "rightmost": "right", "topmost": "top", "uppermost": "top",
             "bottommost": "bottom", "lowermost": "bottom", "lowest": "bottom", "highest": "top"}
_FAR = ("far", "farthest", "furthest", "extreme")  # "far left", "furthest right" = the extreme
_MIDDLE = frozenset({"middle", "center", "centre", "central", "centered", "centred", "midst"})
# size superlatives and comparatives: word -> (sign, measure); +1 the biggest, -1 the smallest
_SIZE: dict[str, tuple[int, str]] = {
    "biggest": (1, "area"), "bigger": (1, "area"), "largest": (1, "area"), "larger": (1, "area"),
    "smallest": (-1, "area"), "smaller": (-1, "area"), "tiniest": (-1, "area"), "tinier": (-1, "area"),
    "littlest": (-1, "area"), "tallest": (1, "height"), "taller": (1, "height"), "shortest": (-1, "height"),
    "shorter": (-1, "height"), "widest": (1, "width"), "wider": (1, "width"), "narrowest": (-1, "width"),
    "narrower": (-1, "width"), "longest": (1, "area"), "longer": (1, "area"),
}
# words after a side word that make it part of a compound, not a place: "left-handed", "right wing"
_SIDE_COMPOUNDS = frozenset({"handed", "hander", "handers", "wing", "winger", "wingers", "leaning", "minded",
                             "angled", "angle", "hat", "hats", "notch", "gun", "answer", "answers", "way",
                             "time", "choice", "choices", "decision", "idea", "moment", "question", "word",
                             "words", "size", "fit", "price", "thing", "things", "call", "move", "spot", "now",
                             "away", "here", "there", "then", "turn", "turns", "triangle", "triangles",
                             "brain", "click", "ascension", "wingers"})
# words between "from" and the side of an ordinal: "from the viewer's left", "from the very left", "from our right"
_ORDINAL_FILLERS = frozenset({"the", "far", "very", "extreme", "viewer", "viewers", "camera", "picture", "photo",
                              "image", "'s", "’s", "'", "our", "my", "your", "his", "her", "their"})
# verbs of counting that may stand between an ordinal and "from": "the second car counting from the left"
_COUNTING = frozenset({"counting", "starting", "beginning", "going", "moving", "reading", "count", "start"})
# words before "top" that make it a garment or a thing: "tank top", "big top"
_TOP_COMPOUNDS = frozenset({"tank", "crop", "tube", "halter", "spinning", "big", "tip", "bottle", "table",
                            "roof", "desk", "lap", "counter", "hill", "tree", "mountain"})
_MIDDLE_COMPOUNDS = frozenset({"school", "class", "age", "ages", "aged", "finger", "name", "east", "eastern",
                               "earth", "ground", "weight", "distance"})
# relation phrases (lower-case word sequences) by family; the longest match wins
_RELATION_PHRASES: dict[tuple[str, ...], str] = {
    ("next", "to"): "near", ("close", "to"): "near", ("beside",): "near", ("besides",): "near",
    ("near",): "near", ("nearest",): "near", ("nearest", "to"): "near", ("closest", "to"): "near",
    ("near", "to"): "near", ("alongside",): "near", ("adjacent", "to"): "near", ("by",): "near",
    ("behind",): "behind", ("in", "back", "of"): "behind",
    ("in", "front", "of"): "front", ("infront", "of"): "front",
    ("on",): "on", ("on", "top", "of"): "on", ("atop",): "on", ("above",): "on", ("over",): "on",
    ("onto",): "on", ("upon",): "on", ("riding",): "on", ("sitting", "on"): "on", ("standing", "on"): "on",
    ("under",): "under", ("underneath",): "under", ("beneath",): "under", ("below",): "under",
    ("left", "of"): "left_of", ("to", "the", "left", "of"): "left_of", ("on", "the", "left", "of"): "left_of",
    ("right", "of"): "right_of", ("to", "the", "right", "of"): "right_of",
    ("on", "the", "right", "of"): "right_of",
    ("holding",): "holding", ("carrying",): "holding", ("with",): "holding", ("wearing",): "holding",
    ("has",): "holding", ("having",): "holding", ("holds",): "holding", ("carries",): "holding",
}
_MAX_PHRASE = max(len(k) for k in _RELATION_PHRASES)
# nouns for the image itself: "on the right of the picture" places the target in the frame, relating it to nothing
_FRAME_NOUNS = frozenset({"picture", "pic", "photo", "photograph", "image", "frame", "screen", "shot", "scene"})
# verbs of motion or gaze whose side word is a direction, not a place: "turning left", "looking right"
_MOTION_VERBS = frozenset({"turn", "turns", "turning", "turned", "look", "looks", "looking", "looked", "face",
                           "faces", "facing", "faced", "head", "heads", "heading", "headed", "go", "goes", "going",
                           "move", "moves", "moving", "point", "points", "pointing", "pointed", "glance", "glancing",
                           "gaze", "gazing", "stare", "staring", "veer", "veering", "swerve", "swerving", "steer",
                           "steering", "lean", "leans", "leaning", "bend", "bending", "swing", "swinging"})
# words after the verb "left" that make it the verb: "the boy left alone", "the bag left unattended"
_LEFT_VERB_AFTER = frozenset({"alone", "unattended", "over", "out", "empty", "open", "idle"})
# relation families that "right" may intensify ("right next to", "right behind"); never "right holding"
_INTENSIFIED = frozenset({"near", "behind", "front", "on", "under"})
_ATTRIBUTE_DEPS = ("amod", "compound", "nummod", "nmod", "poss")
_HYPHEN_RE = re.compile(r"\w+(?:-\w+)+")


@dataclass(frozen=True)
class FrameTerm:
    """A place or size of the target among its candidates.

    kind "position": ``side`` (left/right/top/bottom); "middle"; "ordinal": the ``order``-th from ``side``
    ("leftmost" = 1st from the left); "size": ``sign`` +1 the biggest / -1 the smallest by ``measure``.
    ``of``: None for a term of the target, else the related object's head noun ("next to the biggest plate")."""

    kind: str
    word: str
    span: tuple[int, int]
    side: str | None = None
    order: int | None = None
    sign: int = 0
    measure: str | None = None
    of: str | None = None  # None: a term of the target; else the related object's head noun (Relation.other)


@dataclass(frozen=True)
class Relation:
    """The target related to another named object: ``family`` (RELATION_FAMILIES), the ``phrase`` as written
    and the other object's head noun ``other`` (with its character span in the text)."""

    family: str
    phrase: str
    other: str
    other_span: tuple[int, int]


@dataclass(frozen=True)
class Expression:
    """What a referring expression says: the target noun (the preset's root word), the target noun phrase,
    its attributes, its terms in the frame, its relations, and the other objects it names (CLIP negatives)."""

    text: str
    target: str
    target_span: tuple[int, int]
    target_phrase: str
    attributes: tuple[str, ...] = ()
    frame: tuple[FrameTerm, ...] = ()
    relations: tuple[Relation, ...] = ()
    others: tuple[str, ...] = ()
    open: bool = False  # the target names no object: a placeholder ("the one on the right") or no noun ("left")
    parsed: ParsedText | None = field(default=None, compare=False, repr=False)

    def frame_of(self, kind: str) -> tuple[FrameTerm, ...]:
        """The frame terms of one kind (of the target and of the related objects)."""
        return tuple(t for t in self.frame if t.kind == kind)

    @property
    def target_frame(self) -> tuple[FrameTerm, ...]:
        """The frame terms that place the target itself."""
        return tuple(t for t in self.frame if t.of is None)

    def frame_of_other(self, noun: str) -> tuple[FrameTerm, ...]:
        """The frame terms of a related object, named by its head noun (``Relation.other``)."""
        return tuple(t for t in self.frame if t.of == noun)

    def summary(self) -> dict[str, Any]:
        """A plain-data view (for JSON, the CLI and the nodes)."""
        def term(t: FrameTerm) -> dict[str, Any]:
            return {k: v for k, v in (("kind", t.kind), ("word", t.word), ("side", t.side), ("order", t.order),
                                      ("sign", t.sign or None), ("measure", t.measure), ("of", t.of))
                    if v is not None}

        return {"target": self.target, "target_phrase": self.target_phrase, "attributes": list(self.attributes),
                "frame": [term(t) for t in self.frame],
                "relations": [{"family": r.family, "phrase": r.phrase, "other": r.other} for r in self.relations],
                "others": list(self.others), "open": self.open}


def _lower(doc: Any, i: int) -> str:
    return doc[i].lower_ if 0 <= i < len(doc) else ""


def _hyphenated(doc: Any, i: int) -> bool:
    """Token i is joined by a hyphen to the next word ("left-handed", "middle-aged")."""
    return _lower(doc, i + 1) == "-" and doc[i].idx + len(doc[i].text) == doc[i + 1].idx


def _compound_after(doc: Any, i: int, words: frozenset[str]) -> bool:
    """Token i is followed (directly or after a hyphen) by one of ``words``."""
    j = i + 2 if _hyphenated(doc, i) else i + 1
    return _lower(doc, j) in words


def _side_is_place(doc: Any, i: int) -> bool:
    """Whether the side word at token i places the target: not a verb ("who left"), not "on top of", not part of
    a compound or idiom ("left-handed", "right answer", "top hat", "tank top", "right behind")."""
    tok = doc[i]
    word = tok.lower_
    verb = _is_verb_use(tok) and _lower(doc, i - 1) not in _DIRECTION_FORMS  # "bottom left donut" is no verb
    if verb or _is_on_top_of(tok) or _compound_after(doc, i, _SIDE_COMPOUNDS):
        return False
    if _hyphenated(doc, i) and _lower(doc, i + 2) not in ("hand", "side", "most", "corner") \
            and _lower(doc, i + 2) not in _DIRECTION_FORMS:  # "top-left teddy bear" keeps both sides
        return False
    if _is_motion(doc, i):
        return False
    if word == "top" and _lower(doc, i - 1) in _TOP_COMPOUNDS:
        return False
    hit = _phrase_at(doc, i + 1)
    if word == "right" and hit is not None and hit[0] in _INTENSIFIED:  # "right next to": an intensifier
        return False
    return True


def _is_motion(doc: Any, i: int) -> bool:
    """The side word at token i names a direction of motion or gaze ("turning left", "looking to the right"), or is
    the verb "left" of "the boy left alone"."""
    j = i - 1
    if _lower(doc, j) == "the":
        j -= 1
    if _lower(doc, j) == "to":
        j -= 1
    elif j != i - 1:
        return False
    if j >= 0 and doc[j].lower_ in _MOTION_VERBS and (doc[j].pos_ in ("VERB", "AUX") or doc[j].lower_.endswith("ing")):
        return True
    return doc[i].lower_ == "left" and doc[i].pos_ == "VERB" and _lower(doc, i + 1) in _LEFT_VERB_AFTER


def _phrase_at(doc: Any, i: int) -> tuple[str, int] | None:
    """The relation family of the longest relation phrase starting at token i, with its length."""
    for n in range(_MAX_PHRASE, 0, -1):
        key = tuple(_lower(doc, j) for j in range(i, i + n))
        if key in _RELATION_PHRASES:
            return _RELATION_PHRASES[key], n
    return None


def _ordinal_side(doc: Any, i: int) -> str | None:
    """The side of "second [man] from (the) left" / "third to the right": a side word after "from"/"to" within
    a few tokens of the ordinal at token i; None for an ordinal that counts no position ("a second helping")."""
    for j in range(i + 1, min(len(doc), i + 8)):
        if doc[j].lower_ in ("from", "to", "on", "at"):
            k = j + 1
            while _lower(doc, k) in _ORDINAL_FILLERS:
                k += 1
            return _DIRECTION_FORMS.get(_lower(doc, k))
        if doc[j].lower_ in _COUNTING:
            continue
        if doc[j].is_punct or doc[j].pos_ in ("VERB", "AUX") or _phrase_at(doc, j) is not None:
            return None
    return None


def _frame_terms(doc: Any, hits: Sequence[tuple[Relation, int, int]] = ()) -> tuple[tuple[FrameTerm, ...], set[int]]:
    """The frame terms in order of appearance, each attached to its noun (``of``), and the token indices used."""
    terms, used = _frame_words(doc)
    out = []
    for t, i in terms:
        of = next((r.other for r, lo, hi in hits if lo <= i <= hi), None)
        out.append(t if of is None else replace(t, of=of))
    return tuple(out), used


def _frame_words(doc: Any) -> tuple[list[tuple[FrameTerm, int]], set[int]]:
    """The frame terms in order of appearance with the token index of each, and the token indices they use."""
    terms: list[FrameTerm] = []
    at: list[int] = []
    used: set[int] = set()
    relation_tokens = _relation_token_set(doc)
    for i, tok in enumerate(doc):
        if i in used:
            continue
        word = tok.lower_
        span = (tok.idx, tok.idx + len(tok.text))
        if word in _ORDINALS:
            side = _ordinal_side(doc, i)
            if side is not None:
                terms.append(FrameTerm("ordinal", word, span, side=side, order=_ORDINALS[word]))
                at.append(i)
                used.add(i)
                for j in range(i + 1, min(len(doc), i + 10)):  # the side word belongs to the ordinal
                    if _DIRECTION_FORMS.get(doc[j].lower_) == side:
                        used.add(j)
                        break
            continue
        if word in _EXTREMES and not _compound_after(doc, i, _SIDE_COMPOUNDS):
            if word in ("lowest", "highest") and _lower(doc, i + 1) not in ("", "one", "ones") \
                    and tok.dep_ != "amod":
                continue
            terms.append(FrameTerm("ordinal", word, span, side=_EXTREMES[word], order=1))
            at.append(i)
            used.add(i)
            continue
        if word in _DIRECTION_FORMS and i not in relation_tokens and _side_is_place(doc, i):
            far = _far_before(doc, i)
            if far is not None and far < i - 1:  # "farthest to the right": the first from the right
                terms.append(FrameTerm("ordinal", doc[far:i + 1].text, (doc[far].idx, span[1]),
                                       side=_DIRECTION_FORMS[word], order=1))
                at.append(far)
            elif _lower(doc, i - 1) in _FAR:
                terms.append(FrameTerm("ordinal", f"{doc[i - 1].text} {tok.text}", (doc[i - 1].idx, span[1]),
                                       side=_DIRECTION_FORMS[word], order=1))
                at.append(i - 1)
            else:
                terms.append(FrameTerm("position", word, span, side=_DIRECTION_FORMS[word]))
                at.append(i)
            used.add(i)
            continue
        if word in _MIDDLE and not _compound_after(doc, i, _MIDDLE_COMPOUNDS) \
                and not (_hyphenated(doc, i) and _lower(doc, i + 2) in _MIDDLE_COMPOUNDS):
            terms.append(FrameTerm("middle", word, span))
            at.append(i)
            used.add(i)
            continue
        if word in _SIZE and not _hyphenated(doc, i):
            sign, measure = _SIZE[word]
            terms.append(FrameTerm("size", word, span, sign=sign, measure=measure))
            at.append(i)
            used.add(i)
    return list(zip(terms, at)), used


def _far_before(doc: Any, i: int) -> int | None:
    """The index of "far"/"farthest" before the side word at token i ("far left", "farthest to the right")."""
    j = i - 1
    if _lower(doc, j) == "the":
        j -= 1
    if _lower(doc, j) == "to":
        j -= 1
    return j if j >= 0 and _lower(doc, j) in _FAR and (j == i - 1 or _lower(doc, j + 1) == "to") else None


def _phrase_token_set(doc: Any) -> set[int]:
    """Tokens inside any relation phrase ("front" of "in front of")."""
    out: set[int] = set()
    for i in range(len(doc)):
        hit = _phrase_at(doc, i)
        if hit is not None:
            out.update(range(i, i + hit[1]))
    return out


def _relation_token_set(doc: Any) -> set[int]:
    """Tokens inside relation phrases that name a side ("left of", "to the right of")."""
    out: set[int] = set()
    i = 0
    while i < len(doc):
        hit = _phrase_at(doc, i)
        if hit is not None and hit[0] in ("left_of", "right_of") and not _of_the_frame(doc, i + hit[1]):
            out.update(range(i, i + hit[1]))
            i += hit[1]
        else:
            i += 1
    return out


def _of_the_frame(doc: Any, i: int) -> bool:
    """The words from token i name the image itself ("[of] the picture", "of this photo")."""
    while _lower(doc, i) in ("of", "the", "this", "that", "a", "an"):
        i += 1
    return _lower(doc, i) in _FRAME_NOUNS


def _is_frame_noun(doc: Any, i: int) -> bool:
    """Token i is the image itself after "of" ("the bottom of the picture", "the left of this photo")."""
    j = i - 1
    while _lower(doc, j) in ("the", "this", "that", "a", "an"):
        j -= 1
    return doc[i].lower_ in _FRAME_NOUNS and _lower(doc, j) == "of"


def _side_place_end(doc: Any, i: int) -> int | None:
    """After "on" (token i - 1): the end of a side place ("on the right", "on left", "on the far left side"); None
    when no side word follows or the side is of an object ("on the top shelf", "on the left of the car")."""
    j = i
    while _lower(doc, j) in ("the", "far", "very", "extreme"):
        j += 1
    if _lower(doc, j) not in _DIRECTION_FORMS:
        return None
    while _lower(doc, j) in _DIRECTION_FORMS or _lower(doc, j) in ("-", "side", "hand", "corner", "most"):
        j += 1
    if _lower(doc, j) == "of" and not _of_the_frame(doc, j):
        return None
    if j < len(doc) and _is_object(doc[j]) and _phrase_at(doc, j) is None:
        return None
    return j


def _is_object(tok: Any) -> bool:
    """``names_object``, and a garment "top" after its kind ("a crop top", "tank top")."""
    return names_object(tok) or (tok.lower_ in ("top", "tops") and tok.pos_ in ("NOUN", "PROPN")
                                 and _lower(tok.doc, tok.i - 1) in _TOP_COMPOUNDS)


def _object_after(doc: Any, start: int) -> Any:
    """The head noun of the first noun phrase at or after token ``start`` that names an object, stopping at a
    verb, a punctuation mark or another relation phrase; None when there is none."""
    chunks = {c.start: c for c in doc.noun_chunks}
    i = start
    while i < len(doc):
        if i in chunks:
            root = chunks[i].root
            return root if _is_object(root) else None
        tok = doc[i]
        if tok.is_punct or (tok.pos_ in ("VERB", "AUX") and i > start):
            return None
        if names_object(tok) and not (i + 1 < len(doc) and names_object(doc[i + 1])):
            return tok
        i += 1
    return None


def _relations(doc: Any, target: Any) -> tuple[Relation, ...]:
    """Relation phrases after the target followed by a noun phrase naming another object."""
    return tuple(r for r, _, _ in _relation_hits(doc, target))


def _relation_hits(doc: Any, target: Any) -> list[tuple[Relation, int, int]]:
    """The relations, each with the token span of its object's noun phrase (after the phrase, to the noun)."""
    out: list[tuple[Relation, int, int]] = []
    i = target.i + 1
    while i < len(doc):
        hit = _phrase_at(doc, i)
        if hit is None:
            i += 1
            continue
        family, n = hit
        if family == "near" and doc[i].lower_ == "by" and doc[i - 1].pos_ == "VERB":  # "taken by", "pulled by"
            i += 1
            continue
        if family in ("left_of", "right_of") and (i > 0 and doc[i - 1].lower_ == "who"
                                                  or _of_the_frame(doc, i + n)):
            i += n
            continue
        if family == "on" and n == 1 and doc[i].lower_ == "on":  # "on the right holding ...": a place, not "on"
            end = _side_place_end(doc, i + 1)
            if end is not None:
                i = end
                continue
        other = _object_after(doc, i + n)
        if other is not None and other.i != target.i:
            phrase = doc[i:i + n].text
            out.append((Relation(family, phrase, other.text, (other.idx, other.idx + len(other.text))), i + n,
                        other.i))
            i = other.i + 1
        else:
            i += n
    return out


def _target_token(doc: Any, parsed: ParsedText) -> Any:
    """The token of the parsed root; a non-object root hands over to the noun after a side word ("left guy" ->
    guy) or "of" ("the larger of the two dogs" -> dogs), a counting word to its noun ("car counting"), else stays."""
    root = next((t for t in doc if t.idx == parsed.root_span[0]), doc[0])
    noun = _ordinal_noun(doc, root)
    if noun is not None:
        return noun
    if root.lower_ in _COUNTING:
        noun = next((c for c in reversed(list(root.lefts)) if names_object(c)), None)
        if noun is not None:
            return noun
    noun = side_word_noun(root)  # also "front" of "the right front donut", which spaCy may make the root
    if noun is not None:
        return noun
    if names_object(root) and not _is_frame_word(root):
        nxt = doc[root.i + 1] if root.i + 1 < len(doc) else None
        if nxt is not None and nxt.dep_ == "appos" and nxt.head.i == root.i and names_object(nxt) \
                and _lower(doc, root.i - 1) in _DIRECTION_FORMS:  # "the right way sign": one compound noun
            return nxt
        return root
    for tok in doc[root.i + 1:]:
        if names_object(tok):
            if tok.dep_ == "pobj" and tok.head.lower_ == "of" and tok.head.head.i == root.i:
                return tok
            break
    return root


def _is_frame_word(tok: Any) -> bool:
    """An ordinal, extreme, size or middle word (which spaCy may tag as a noun: "the taller", "middle")."""
    word = tok.lower_
    return word in _ORDINALS or word in _EXTREMES or word in _SIZE or word in _MIDDLE


def _ordinal_noun(doc: Any, root: Any) -> Any:
    """The noun after a leading ordinal phrase whose root is the ordinal or its "from" ("second from left guy",
    "2nd from the right banana" -> the noun); None otherwise."""
    i = root.i
    if root.lower_ in ("from", "to") and i > 0 and doc[i - 1].lower_ in _ORDINALS:
        i -= 1
    elif root.lower_ not in _ORDINALS:
        return None
    side = _ordinal_side(doc, i)
    if side is None:
        return None
    k = next((j for j in range(i + 1, min(len(doc), i + 10)) if _DIRECTION_FORMS.get(doc[j].lower_) == side), None)
    return side_word_noun(doc[k]) if k is not None else None


def _is_open(target: Any) -> bool:
    """The target names no object: a placeholder, no noun, or a frame word tagged as a noun ("2nd", "leftmost")."""
    return not (names_object(target) or _tagged_off_noun(target)) or _is_frame_word(target) or \
        target.lower_ in _COUNTING


def _tagged_off_noun(tok: Any) -> bool:
    """A last word that spaCy tags as an adjective or a verb after a frame word: the noun of "the longest
    surfboard", "the longer train"."""
    doc = tok.doc
    return (tok.pos_ in ("ADJ", "VERB", "ADV") and tok.is_alpha and tok.i == len(doc) - 1 and tok.i > 0
            and _is_frame_word(doc[tok.i - 1]) and not _is_frame_word(tok) and tok.lower_ not in _DIRECTION_FORMS)


def parse_expression(text: str, root_rule: str = "root_or_subj", nlp: Any = None,
                     parsed: ParsedText | None = None) -> Expression:
    """The structured parse of ``text`` (the root by ``root_rule``, as the method's own parse)."""
    nlp = nlp if nlp is not None else load_spacy()
    parsed = parsed if parsed is not None else parse_text(text, root_rule=root_rule, nlp=nlp)
    doc = nlp(parsed.text)
    target = _target_token(doc, parsed)
    hits = _relation_hits(doc, target)
    relations = tuple(r for r, _, _ in hits)
    frame, used = _frame_terms(doc, hits)
    chunk = next((c for c in doc.noun_chunks if c.start <= target.i < c.end), None)
    phrase = chunk.text if chunk is not None else target.text
    lo = chunk.start if chunk is not None else target.i
    attributes = tuple(t.text for t in doc[lo:target.i] if t.dep_ in _ATTRIBUTE_DEPS and t.i not in used
                       and t.lower_ not in _ORDINALS and not t.is_punct)
    related = {r.other_span for r in relations}
    others: list[str] = []
    phrase_tokens = _phrase_token_set(doc)
    for tok in doc:
        if (names_object(tok) and tok.i != target.i and tok.lemma_.lower() != target.lemma_.lower()
                and tok.i not in used and tok.i not in phrase_tokens and tok.lower_ not in _MIDDLE
                and tok.dep_ not in ("amod", "compound") and tok.text not in others
                and not (chunk is not None and chunk.start <= tok.i < chunk.end)
                and not (tok.i == target.i - 1 and target.head.i == tok.i)  # "way" of "the right way sign"
                and not _is_frame_noun(doc, tok.i)):
            others.append(tok.text)
    for r in relations:  # every related object is a negative, in the order of appearance
        if r.other not in others and r.other_span in related:
            others.append(r.other)
    return Expression(text=parsed.text, target=target.text, target_span=(target.idx, target.idx + len(target.text)),
                      target_phrase=phrase, attributes=attributes, frame=frame, relations=relations,
                      others=tuple(others), open=_is_open(target), parsed=parsed)


__all__ = ["Expression", "FrameTerm", "Relation", "parse_expression", "FRAME_KINDS", "RELATION_FAMILIES",
           "SIZE_MEASURES", "SIDES"]
