"""The Flux / SD 3 inputs of the capture and segment nodes (nodes/dit_options.py): defaults, checks, the concepts of
a parse and the refusals that name the bad input. Offline: no ComfyUI."""
from __future__ import annotations

import pytest

from refdiff.errors import InputError
from pack_nodes import load_node_module

opts = load_node_module("dit_options")
wire = load_node_module("wire_types")
tp = load_node_module("token_positions")


@pytest.fixture(scope="module")
def item():
    """A parse with positions as a T5 context gives them: 'dog' twice, 'snowboarder' cut in two pieces."""
    from refdiff.tokenizer import clip_tokenizer

    parsed = tp.parse_item("the dog beside the snowboarder and a dog", clip_tokenizer())
    return parsed


def test_defaults_are_those_of_the_method_section():
    d = opts.dit_options()
    assert (d.map_kind, d.blocks, d.flow_t, d.flow_steps) == ("attention", "last4", 0.25, 1)
    assert d.background == ("background", "floor", "wall", "sky")
    assert opts.dit_options(background=" sky, , grass ").background == ("sky", "grass")
    assert "blocks last4, flow t=0.25 x 1 step(s)" in d.describe()


@pytest.mark.parametrize("kwargs, start", [
    ({"map_kind": "logits"}, "map_kind must be one of"),
    ({"blocks": "last0"}, "dit_blocks:"),
    ({"blocks": "1,x"}, "dit_blocks:"),
    ({"flow_t": 0.0}, "flow_t / flow_steps: flow_t must be in (0, 1]"),
    ({"flow_steps": 0}, "flow_t / flow_steps: steps must be at least 1"),
])
def test_bad_widgets_are_named_before_anything_runs(kwargs, start):
    problem = opts.dit_options_problem(**kwargs)
    assert problem is not None and problem.startswith(start), problem
    with pytest.raises(InputError, match=start.split(":")[0]):
        opts.dit_options(**kwargs)


def test_good_widgets_pass():
    assert opts.dit_options_problem("concept", "15,16,-1", 0.5, 3) is None
    assert opts.dit_options_problem() is None  # linked / absent widgets are checked when the node runs


def test_concepts_are_root_then_nouns_then_background(item):
    words = opts.concept_words(item, ("background", "Dog"))
    assert words[0] == item.parsed.root == "dog"
    assert words == ["dog", "snowboarder", "background"]  # 'Dog' repeats a noun: once


def test_concept_positions_follow_every_occurrence_of_the_word(item):
    words = ["dog", "snowboarder", "background"]
    positions = opts.concept_positions(item, words)
    by_word = {}
    for (w, _, _), p in zip(item.parsed.words, item.word_positions):
        by_word.setdefault(w, []).extend(p)
    assert positions[0] == item.root_positions  # the root's own pieces (the first 'dog')
    assert positions[1] == by_word["snowboarder"] and len(positions[1]) >= 1
    assert positions[2] == []  # a background word is not in the text
    assert set(by_word["dog"]) - set(positions[0])  # the second 'dog' is not the root concept's place


def test_unet_only_inputs_are_refused_for_a_dit():
    assert opts.unused_unet_inputs("probs", 0, False) is None
    assert opts.unused_unet_inputs("logits", 0, False).startswith("kind:")
    assert opts.unused_unet_inputs("probs", 2, False).startswith("steps:")
    assert opts.unused_unet_inputs("probs", 0, True).startswith("self_attention:")


def test_a_parse_of_another_text_context_is_refused():
    opts.check_parse_context("Flux", "Flux")
    opts.check_parse_context("SD1.x", "CLIP")
    opts.check_parse_context("SDXL", "CLIP")
    with pytest.raises(InputError, match=r"^parse: .*CLIP text context.*Flux MODEL.*connect the Flux CLIP"):
        opts.check_parse_context("Flux", "CLIP")
    with pytest.raises(InputError, match=r"^parse: .*SD3 text context.*SDXL MODEL"):
        opts.check_parse_context("SDXL", "SD3")
    assert wire.ParsedBatch([]).context == "CLIP"


def test_supported_families_are_named():
    for family in ("SD 1.x/2.x", "SDXL", "Flux", "SD 3"):
        assert family in opts.SUPPORTED_MODELS


def test_dit_widgets_changed_on_a_unet_model_are_named():
    assert opts.dit_inputs_on_unet(None, "SD1.x") is None
    assert opts.dit_inputs_on_unet(opts.DitOptions(), "SDXL") is None
    changed = opts.dit_options(map_kind="concept", blocks="all", background="sky")
    problem = opts.dit_inputs_on_unet(changed, "SD1.x")
    assert problem.startswith("map_kind, dit_blocks, background: Flux / SD 3 inputs, but this MODEL is SD1.x")
