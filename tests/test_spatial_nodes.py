"""RefDiffSpatial's stage (nodes/spatial_scores.py) on planted boxes: the ranking changes exactly where the words
say, every term off is the plain fusion, relations read the other noun's map from the captured attention, and
the selection node's table and gallery show each term's contribution (nodes/previews.py)."""
from __future__ import annotations

import pytest
import torch

from refdiff.capture import CrossAttentionMaps
from refdiff.config import PLUS, SPATIAL_TERMS, get_preset
from refdiff.errors import InputError
from refdiff.scoring import fuse_and_select
from pack_nodes import load_node_module as _load

spatial_scores = _load("spatial_scores")
previews = _load("previews")
token_positions = _load("token_positions")
wire_types = _load("wire_types")

SIZE = 64  # image side; the latent grid is 8 x 8 (image_hw = 8 * latent)


@pytest.fixture(scope="module")
def tokenizer():
    from refdiff.tokenizer import clip_tokenizer

    return clip_tokenizer()


def _boxes(boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


# four equal boxes in a row, left to right, given out of order so that the index is not the position
ROW = [(24, 48, 40, 60), (24, 4, 40, 16), (24, 34, 40, 46), (24, 18, 40, 30)]  # x order: 1, 3, 2, 0
ROW_S_D = torch.tensor([0.32, 0.30, 0.29, 0.31])  # alone, proposal 0 (the rightmost) wins
ROW_S_G = torch.tensor([0.10, -0.20, 0.40, 0.05])


def _scores(values: list[torch.Tensor], kind: str) -> "wire_types.ScoreBatch":
    return wire_types.ScoreBatch([v.float() for v in values], kind=kind, counts=[int(v.shape[0]) for v in values])


def _parse(tokenizer, *texts: str) -> "wire_types.ParsedBatch":
    return wire_types.ParsedBatch([token_positions.parse_item(t, tokenizer) for t in texts])


def _chosen(masks: torch.Tensor, total: torch.Tensor) -> int:
    return fuse_and_select(masks, None, total, top_k=1).index


def test_second_from_the_left_picks_the_second_box(tokenizer):
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks], source="sam")
    parse = _parse(tokenizer, "the second dog from the left")
    plain = fuse_and_select(masks, None, ROW_S_D, PLUS).index
    out, notes = spatial_scores.spatial_score_batch(proposals, None, _scores([ROW_S_D], "discriminative"), parse,
                                                    PLUS, SPATIAL_TERMS)
    assert plain == 0
    assert _chosen(masks, out.scores[0]) == 3  # second from the left: x order 1, 3, 2, 0
    applied = out.spatial[0]
    assert set(applied.contributions) == {"ordinals"}  # the words say an ordinal only
    unit = PLUS.spatial_ordinal_weight * PLUS.spatial_pool_margin  # one-hot, in units of the pool margin
    assert torch.equal(applied.contributions["ordinals"], torch.tensor([0.0, 0.0, 0.0, unit]))
    assert torch.allclose(out.scores[0], ROW_S_D + applied.contributions["ordinals"])
    assert out.kind == "fused" and out.counts == [4]
    assert "ordinal 'second' (side left, order 2)" in notes[0] and "target 'dog'" in notes[0]


def test_every_term_off_is_the_plain_fusion(tokenizer):
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks, masks[[2, 0, 3, 1]]], source="sam")
    gen = _scores([ROW_S_G, ROW_S_G[[2, 0, 3, 1]]], "generative")
    disc = _scores([ROW_S_D, ROW_S_D[[2, 0, 3, 1]]], "discriminative")
    parse = _parse(tokenizer, "the second dog from the left", "the biggest dog on the right")
    for preset in (get_preset("official"), get_preset("paper"), PLUS):
        out, _ = spatial_scores.spatial_score_batch(proposals, gen, disc, parse, preset, ())
        for i, m in enumerate(proposals.masks):
            plain = fuse_and_select(m, gen.scores[i], disc.scores[i], preset)
            assert torch.equal(out.scores[i], plain.fused)
            assert _chosen(m, out.scores[i]) == plain.index
            assert out.spatial[i].contributions == {}
        assert out.weights == (preset.gen_weight, preset.disc_weight)


def test_each_image_of_a_batch_follows_its_own_words(tokenizer):
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks, masks], source="sam")
    disc = _scores([ROW_S_D, ROW_S_D], "discriminative")
    parse = _parse(tokenizer, "the leftmost dog", "the third dog from the left")
    out, _ = spatial_scores.spatial_score_batch(proposals, None, disc, parse, PLUS, SPATIAL_TERMS)
    assert [_chosen(masks, s) for s in out.scores] == [1, 2]
    # a term switched off leaves its image's ranking alone
    off, _ = spatial_scores.spatial_score_batch(proposals, None, disc, parse, PLUS, ("size", "middle"))
    assert [_chosen(masks, s) for s in off.scores] == [0, 0]


def test_weights_and_pool_come_from_the_node_inputs():
    preset, terms = spatial_scores.spatial_preset(PLUS, ["size", "ordinals"], {"ordinals": 0.25}, pool=3)
    assert terms == ("ordinals", "size")
    assert preset.spatial_ordinal_weight == 0.25 and preset.spatial_pool == 3
    assert preset.spatial_size_weight == PLUS.spatial_size_weight
    with pytest.raises(InputError, match="unknown spatial term"):
        spatial_scores.spatial_preset(PLUS, ["colour"])
    with pytest.raises(InputError, match="pool must be >= 1"):
        spatial_scores.spatial_preset(PLUS, [], pool=0)


def _attention(item, noun: str, cell_box: tuple[int, int, int, int]) -> "wire_types.AttentionBatch":
    """One image's capture on an 8 x 8 grid where ``noun``'s last token attends to ``cell_box`` only."""
    words = [w for w, _, _ in item.parsed.words]
    position = item.word_positions[words.index(noun)][-1]
    cond = torch.zeros(1, 8, 8, 77)
    y0, x0, y1, x1 = cell_box
    cond[0, y0:y1, x0:x1, position] = 1.0
    cond[0, 1, 1, item.root_position] = 1.0
    maps = CrossAttentionMaps(cond=cond, uncond=None, layers=("step0/x",), kind="probs")
    return wire_types.AttentionBatch(maps=[maps], prompts=[item.prompt], tokens=[None], latent_hw=(8, 8),
                                     guidance_scale=9.0, kind="probs", model_family="SD1.x")


def test_next_to_reads_the_other_nouns_map_from_the_capture(tokenizer):
    # dog far left, the cat in the middle, a dog right beside the cat
    masks = _boxes([(24, 0, 40, 16), (24, 24, 40, 40), (24, 40, 40, 56)])
    s_d = torch.tensor([0.30, 0.10, 0.28])
    proposals = wire_types.ProposalBatch([masks], source="sam")
    parse = _parse(tokenizer, "the dog next to the cat")
    attention = _attention(parse.items[0], "cat", (3, 3, 5, 5))
    disc = _scores([s_d], "discriminative")
    out, notes = spatial_scores.spatial_score_batch(proposals, None, disc, parse, PLUS, SPATIAL_TERMS, attention)
    assert _chosen(masks, s_d) == 0
    assert _chosen(masks, out.scores[0]) == 2
    rel = out.spatial[0].contributions["relations"]
    assert rel[2] > rel[0] and rel[2] > rel[1]  # the cat itself scores low (1 - IoU with its own region)
    assert "near 'cat'" in notes[0]
    # without the capture the relation is not applied, and the note says how to fix it
    bare, notes = spatial_scores.spatial_score_batch(proposals, None, disc, parse, PLUS, SPATIAL_TERMS)
    assert _chosen(masks, bare.scores[0]) == 0 and "relations" not in bare.spatial[0].contributions
    assert any("relations not applied: connect attention" in n for n in notes)
    assert any("negatives not applied: connect clip and image" in n for n in notes)


def test_negatives_adjust_only_scores_that_hold_s_d(tokenizer):
    """refdiff.spatial.negatives_apply, as RefDiff: with s_D the other nouns' similarity is subtracted; on s_G alone
    (variants G, GS) a connected CLIP changes nothing, and the note says why."""
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks], source="sam")
    parse = _parse(tokenizer, "the dog and the cat")
    similarity = torch.tensor([0.5, 0.1, 0.2, 0.3])
    calls = []

    def negatives(i, expr, m):
        calls.append(expr.others)
        return similarity

    gen = _scores([ROW_S_G], "generative")
    only_g, notes = spatial_scores.spatial_score_batch(proposals, gen, None, parse, PLUS, SPATIAL_TERMS,
                                                      negatives=negatives)
    assert not calls and "negatives" not in only_g.spatial[0].contributions
    assert only_g.scores[0].tolist() == only_g.spatial[0].base.tolist()
    assert any("negatives: none (they adjust the CLIP score s_D" in n for n in notes)
    assert not any("not applied" in n for n in notes)
    both, _ = spatial_scores.spatial_score_batch(proposals, gen, _scores([ROW_S_D], "discriminative"), parse, PLUS,
                                                 SPATIAL_TERMS, negatives=negatives)
    assert calls == [("cat",)]
    assert both.spatial[0].contributions["negatives"].tolist() == pytest.approx(
        (-PLUS.spatial_negative_weight * similarity).tolist())


def test_mismatched_wiring_is_refused_by_name(tokenizer):
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks], source="sam")
    parse = _parse(tokenizer, "the leftmost dog")
    with pytest.raises(InputError, match="connect generative scores, discriminative scores or both"):
        spatial_scores.spatial_score_batch(proposals, None, None, parse, PLUS, SPATIAL_TERMS)
    with pytest.raises(InputError, match="discriminative: these discriminative scores were computed for"):
        spatial_scores.spatial_score_batch(proposals, None, _scores([ROW_S_D[:3]], "discriminative"), parse, PLUS,
                                           SPATIAL_TERMS)
    fused, _ = spatial_scores.spatial_score_batch(proposals, None, _scores([ROW_S_D], "discriminative"), parse,
                                                  PLUS, SPATIAL_TERMS)
    with pytest.raises(InputError, match="already went through RefDiffSpatial"):
        spatial_scores.spatial_score_batch(proposals, None, fused, parse, PLUS, SPATIAL_TERMS)


def test_table_and_gallery_show_each_terms_contribution(tokenizer):
    masks = _boxes(ROW)
    proposals = wire_types.ProposalBatch([masks], source="sam")
    parse = _parse(tokenizer, "the second dog from the left")
    out, _ = spatial_scores.spatial_score_batch(proposals, _scores([ROW_S_G], "generative"),
                                                _scores([ROW_S_D], "discriminative"), parse, PLUS, SPATIAL_TERMS)
    applied, total = out.spatial[0], out.scores[0]
    table = previews.score_table(masks, total, [3, 0], 3, ROW_S_G, ROW_S_D, "image 0", base=applied.base,
                                 terms=applied.contributions)
    first = table.splitlines()[1]
    assert f"base {float(applied.base[3]):+.4f}" in first and f"ordinals {PLUS.spatial_ordinal_weight * PLUS.spatial_pool_margin:+.4f}" in first
    assert f"fused {float(total[3]):+.4f}" in first and first.endswith("<- selected")
    view = previews.proposal_gallery_view(masks, total, ROW_S_G, ROW_S_D, [3, 0], 3, [{}, {}], base=applied.base,
                                          terms=applied.contributions, spatial=True, weights=out.weights)
    assert view["spatial"] == ["ordinals"]
    top = view["items"][0]
    bonus = PLUS.spatial_ordinal_weight * PLUS.spatial_pool_margin
    assert top["index"] == 3 and top["terms"] == {"ordinals": pytest.approx(bonus)}
    assert top["base"] == pytest.approx(float(applied.base[3]))
    assert top["fused"] == pytest.approx(top["base"] + bonus)
    plain = previews.proposal_gallery_view(masks, total, ROW_S_G, ROW_S_D, [3], 3, [{}])
    assert "spatial" not in plain and "terms" not in plain["items"][0]


def test_parse_summary_says_what_was_understood(tokenizer):
    items = [token_positions.parse_item(t, tokenizer) for t in ("the biggest red dog left of the cat", "a dog")]
    summary = token_positions.parse_summary(items, understood=True).splitlines()
    assert len(summary) == 4 and summary[0].startswith("[0] 'the biggest red dog left of the cat': root 'dog'")
    said = summary[1]
    assert said.startswith("    understood: target 'dog', attributes red")
    assert "spatial: size 'biggest' (sign 1, measure area)" in said
    assert "relations: left_of 'cat' ('left of')" in said and "other nouns cat" in said
    assert summary[3] == "    understood: target 'dog', spatial: none, relations: none"
    assert "understood" not in token_positions.parse_summary(items)



def _planted_frame_cases() -> list[tuple[str, dict]]:
    import json
    from pathlib import Path

    spec = json.loads((Path(__file__).parent / "data" / "spatial_expressions.json").read_text())
    forms = ("ordinal", "extreme", "position", "middle", "size", "two_classes")
    return [(c, spec["scenes"][c["scene"]]) for f in forms for c in spec["forms"][f] if c["pick"] is not None]


@pytest.mark.parametrize("case,scene", _planted_frame_cases(), ids=[c["text"] for c, _ in _planted_frame_cases()])
def test_planted_scenes_through_the_node_stage_at_the_defaults(tokenizer, case: dict, scene: dict) -> None:
    """Every frame form on the planted scenes (bands, parts, groups, another class) through the function
    RefDiffSpatial and RefDiffSegment run, with the node's defaults (preset plus), the scores as s_D."""
    masks = torch.zeros(len(scene["boxes"]), *scene["size"], dtype=torch.bool)
    for i, entry in enumerate(scene["boxes"]):
        for y0, x0, y1, x1 in (entry if isinstance(entry[0], list) else [entry]):
            masks[i, y0:y1, x0:x1] = True
    proposals = wire_types.ProposalBatch([masks], source="sam")
    s_d = torch.tensor(scene["fused"])
    out, _ = spatial_scores.spatial_score_batch(proposals, None, _scores([s_d], "discriminative"),
                                                _parse(tokenizer, case["text"]), PLUS, SPATIAL_TERMS)
    assert _chosen(masks, out.scores[0]) == case["pick"], (out.spatial[0].contributions, out.spatial[0].pool)
