"""Parse forms of the referring expression: frame words attached to their noun, the open target class, side
words before the noun, ordinal phrasings and side-word compounds (docs/METHOD.md section 13)."""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("spacy")

from refdiff.expression import parse_expression  # noqa: E402
from refdiff.text import load_spacy, parse_text  # noqa: E402


@pytest.fixture(scope="module")
def nlp() -> Any:
    try:
        return load_spacy()
    except Exception as exc:  # noqa: BLE001 - no pipeline installed
        pytest.skip(f"no spaCy pipeline: {exc}")


def _frame(text: str, nlp: Any) -> list[dict[str, Any]]:
    return parse_expression(text, nlp=nlp).summary()["frame"]


# ------------------------------------------------------------------ 1. frame words attached to their noun
@pytest.mark.parametrize("text, frame, target", [
    ("the cup next to the biggest plate",
     [{"kind": "size", "word": "biggest", "sign": 1, "measure": "area", "of": "plate"}], "cup"),
    ("the dog next to the leftmost car",
     [{"kind": "ordinal", "word": "leftmost", "side": "left", "order": 1, "of": "car"}], "dog"),
    ("the woman behind the second car from the left",
     [{"kind": "ordinal", "word": "second", "side": "left", "order": 2, "of": "car"}], "woman"),
    ("the man next to the far left car",
     [{"kind": "ordinal", "word": "far left", "side": "left", "order": 1, "of": "car"}], "man"),
    ("the cat next to the middle dog", [{"kind": "middle", "word": "middle", "of": "dog"}], "cat"),
    ("the man on the left next to the car", [{"kind": "position", "word": "left", "side": "left"}], "man"),
    ("the leftmost man next to the car",
     [{"kind": "ordinal", "word": "leftmost", "side": "left", "order": 1}], "man"),
    ("the second car from the left next to the tree",
     [{"kind": "ordinal", "word": "second", "side": "left", "order": 2}], "car"),
    ("the biggest plate", [{"kind": "size", "word": "biggest", "sign": 1, "measure": "area"}], "plate"),
    ("the smallest cup to the left of the biggest plate",
     [{"kind": "size", "word": "smallest", "sign": -1, "measure": "area"},
      {"kind": "size", "word": "biggest", "sign": 1, "measure": "area", "of": "plate"}], "cup"),
    ("the car to the left of the truck", [], "car"),
])
def test_frame_terms_attach_to_their_noun(nlp: Any, text: str, frame: list[dict[str, Any]], target: str) -> None:
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["target"] == target
    assert summary["frame"] == frame


def test_target_frame_and_the_frame_of_a_related_object(nlp: Any) -> None:
    expr = parse_expression("the smallest cup to the left of the biggest plate", nlp=nlp)
    assert [t.word for t in expr.target_frame] == ["smallest"]
    assert [t.word for t in expr.frame_of_other("plate")] == ["biggest"]
    assert expr.frame_of_other("cup") == ()
    assert [r.family for r in expr.relations] == ["left_of"]
    assert parse_expression("the car to the left of the truck", nlp=nlp).relations[0].family == "left_of"


@pytest.mark.parametrize("text, attributes", [
    ("the cup next to the red plate", []),
    ("the red cup next to the blue plate", ["red"]),
    ("the white thing on the left", ["white"]),
])
def test_only_the_targets_own_modifiers_are_attributes(nlp: Any, text: str, attributes: list[str]) -> None:
    assert parse_expression(text, nlp=nlp).summary()["attributes"] == attributes


# ------------------------------------------------------------------------------ 2. open target class
@pytest.mark.parametrize("text, frame, attributes", [
    ("the second from the left", [{"kind": "ordinal", "word": "second", "side": "left", "order": 2}], []),
    ("leftmost", [{"kind": "ordinal", "word": "leftmost", "side": "left", "order": 1}], []),
    ("the biggest one", [{"kind": "size", "word": "biggest", "sign": 1, "measure": "area"}], []),
    ("the one on the right", [{"kind": "position", "word": "right", "side": "right"}], []),
    ("the white thing on the left", [{"kind": "position", "word": "left", "side": "left"}], ["white"]),
    ("left", [{"kind": "position", "word": "left", "side": "left"}], []),
    ("2nd from the right", [{"kind": "ordinal", "word": "2nd", "side": "right", "order": 2}], []),
])
def test_open_targets_keep_their_frame_terms(nlp: Any, text: str, frame: list[dict[str, Any]],
                                             attributes: list[str]) -> None:
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["open"] is True
    assert summary["frame"] == frame
    assert summary["attributes"] == attributes


@pytest.mark.parametrize("text", ["the dog on the left", "the biggest plate", "left guy", "the red box",
                                  "the one next to the car"])
def test_targets_that_name_an_object_are_not_open(nlp: Any, text: str) -> None:
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["open"] is (text == "the one next to the car")
    assert "open" in summary


# ------------------------------------------------------------------------ 3. side words before the noun
SIDE_PHRASES = [("bottom right cake", "cake"), ("upper left window", "window"),
                ("lower right corner of the table", "corner"), ("top-left box", "box"), ("far left guy", "guy"),
                ("bottom left player", "player"), ("top right bear", "bear"), ("right front car", "car"),
                ("left zebra", "zebra"), ("left guy in red", "guy"), ("left white car", "car"),
                ("bottom left donut", "donut"), ("the bottom left zebra", "zebra"), ("top left donut", "donut"),
                ("the bottom left horse with a hat", "horse"), ("left side guy", "guy"),
                ("the right front donut", "donut"), ("left blue shirt guy", "guy")]


@pytest.mark.parametrize("text, noun", SIDE_PHRASES)
def test_side_words_before_the_noun_never_become_the_target(nlp: Any, text: str, noun: str) -> None:
    expr = parse_expression(text, nlp=nlp)
    assert expr.target == noun and expr.open is False
    assert expr.target_frame and all(t.of is None for t in expr.frame)


@pytest.mark.parametrize("text, noun", SIDE_PHRASES)
def test_side_words_before_the_noun_never_become_the_head_noun_root(nlp: Any, text: str, noun: str) -> None:
    assert parse_text(text, root_rule="root", nlp=nlp).root == noun


@pytest.mark.parametrize("text, root", [("left zebra", "left"), ("bottom left donut", "bottom"),
                                        ("the dog on the left", "dog")])
def test_the_released_rule_keeps_its_root(nlp: Any, text: str, root: str) -> None:
    assert parse_text(text, root_rule="root_or_subj", nlp=nlp).root == root


@pytest.mark.parametrize("text, root", [("the red box on the left", "box"), ("the smallest cup", "cup"),
                                        ("the second box from the right next to the blue square", "box"),
                                        ("the black horse jumping on the left", "horse"),
                                        ("on the left", "on"), ("left two", "left")])
def test_the_head_noun_rule_elsewhere_is_unchanged(nlp: Any, text: str, root: str) -> None:
    assert parse_text(text, root_rule="root", nlp=nlp).root == root


def test_plus_takes_the_head_noun_rule_and_official_the_released_one() -> None:
    from refdiff.config import get_preset

    assert get_preset("plus").root_rule == "root" and get_preset("paper").root_rule == "root"
    assert get_preset("official").root_rule == "root_or_subj"


# ------------------------------------------------------------------------------- 4. more ordinal forms
@pytest.mark.parametrize("text, word, side, order, target", [
    ("the second car counting from the left", "second", "left", 2, "car"),
    ("third starting from the right", "third", "right", 3, "starting"),
    ("the second man from the left side", "second", "left", 2, "man"),
    ("the second person from the viewer's left", "second", "left", 2, "person"),
    ("the man on the far right side", "far right", "right", 1, "man"),
    ("second from left", "second", "left", 2, "second"),
    ("2nd from the right", "2nd", "right", 2, "2nd"),
])
def test_ordinal_forms(nlp: Any, text: str, word: str, side: str, order: int, target: str) -> None:
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["frame"] == [{"kind": "ordinal", "word": word, "side": side, "order": order}]
    assert summary["target"] == target


@pytest.mark.parametrize("text", ["a left turn", "right angle", "the right answer", "left-handed",
                                  "the man who left", "the right triangle"])
def test_side_words_in_compounds_are_no_frame_term(nlp: Any, text: str) -> None:
    assert _frame(text, nlp) == []


@pytest.mark.parametrize("text, target", [("the right lane", "lane"), ("the car in the right lane", "car"),
                                          ("the left side of the road", "road")])
def test_side_words_that_place_the_target(nlp: Any, text: str, target: str) -> None:
    side = "left" if "left" in text else "right"
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["target"] == target
    assert summary["frame"] == [{"kind": "position", "word": side, "side": side}]


# ------------------------------------------------------------- 5. places before relations, the frame itself
@pytest.mark.parametrize("text, target, frame, relations", [
    ("second from left guy", "guy", [("ordinal", "left", 2)], []),
    ("2nd from the right banana", "banana", [("ordinal", "right", 2)], []),
    ("the man farthest to the right", "man", [("ordinal", "right", 1)], []),
    ("top-left teddy bear", "bear", [("position", "top", None), ("position", "left", None)], []),
    ("the boy on the right holding a frisbee", "boy", [("position", "right", None)], [("holding", "frisbee")]),
    ("woman on left with umbrella", "woman", [("position", "left", None)], [("holding", "umbrella")]),
    ("the cat on the right of the picture", "cat", [("position", "right", None)], []),
    ("the bird in the top left of the photo", "bird", [("position", "top", None), ("position", "left", None)], []),
    ("the man on the left of the dog", "man", [], [("left_of", "dog")]),
    ("the book on the top shelf", "book", [("position", "top", None)], [("on", "shelf")]),
    ("middle man holding racket", "man", [("middle", None, None)], [("holding", "racket")]),
    ("middle of the three dogs", "dogs", [("middle", None, None)], []),
    ("the taller of the two men", "men", [("size", None, None)], []),
    ("the right way sign", "sign", [], []),
    ("girl wearing a crop top", "girl", [], [("holding", "top")]),
    ("the boy left alone", "boy", [], []),
    ("the guy turning left", "guy", [], []),
    ("the zebra looking right", "zebra", [], []),
])
def test_places_before_relations_and_the_frame_itself(nlp: Any, text: str, target: str, frame: list[Any],
                                                      relations: list[Any]) -> None:
    summary = parse_expression(text, nlp=nlp).summary()
    assert summary["target"] == target and summary["open"] is False
    assert [(t["kind"], t.get("side"), t.get("order")) for t in summary["frame"]] == frame
    assert [(r["family"], r["other"]) for r in summary["relations"]] == relations
    assert not {"picture", "photo"} & set(summary["others"])


@pytest.mark.parametrize("text, is_open", [("the longest surfboard", False), ("the longer train", False),
                                           ("the blue item", True), ("the item on top", True)])
def test_open_flag_of_mistagged_nouns_and_items(nlp: Any, text: str, is_open: bool) -> None:
    assert parse_expression(text, nlp=nlp).summary()["open"] is is_open
