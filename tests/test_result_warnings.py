"""What a run says about itself: Result.warnings and RefDiffWarning for a text that names no object and for a
SAM post-filter that removes every proposal (tiny random models, planted SAM masks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.errors import InputError, RefDiffWarning
from refdiff.pipeline import RefDiff

from tiny_runs import FAST


def make(models, preset="official", **overrides):
    sd, sam, clip = models
    return RefDiff(sd=sd, sam=sam, clip=clip, preset=preset, **{**FAST, **overrides})


def test_filter_that_removes_everything_says_so(models, image):
    model = make(models, sam_min_area=10**9)  # every SAM mask is filtered out
    with pytest.warns(RefDiffWarning, match="the SAM post-filter removed"):
        r = model(image, "the blue box", variant="full")
    assert r.proposals.shape == (0, 45, 67) and not r.mask.any()
    assert len(r.warnings) == 1 and "sam_min_area=1000000000" in r.warnings[0]  # the empty mask is explained
    assert make(models)(image, "the blue box", variant="full").warnings == []


def test_text_naming_no_object_warns_by_default_and_can_be_refused(models, image):
    with pytest.warns(RefDiffWarning, match="names no object"):
        results = make(models).segment_variants(image, "on the left", ["G", "DS"])
    for r in results.values():  # the preset's root is kept, and every result carries the note
        assert r.root_token == "on" and r.direction == ("left",) and r.mask.shape == (45, 67)
        assert r.warnings == ["text 'on the left' names no object, so the target class is open: with no "
                              "object noun the attention map follows the root word 'on', and the spatial terms "
                              "rank all whole-object candidates; add the object's noun to name the target, e.g. "
                              "'the dog on the left'"]
    strict = make(models, no_noun="error")
    with pytest.raises(InputError, match="text 'on the left' names no object .* add the object's noun"):
        strict(image, "on the left", variant="DS")
    assert strict(image, "the box on the left", variant="DS").warnings == []
    with pytest.raises(InputError, match="no_noun must be one of"):
        make(models, no_noun="silent")


@pytest.mark.parametrize("text, term, pick", [("the second from the left", "ordinals", 2), ("leftmost", "ordinals", 0),
                                              ("the biggest one", "size", 1), ("the one on the right", "position", 1),
                                              ("the white thing on the left", "position", 0)])
def test_placeholder_texts_run_with_every_spatial_term_and_say_the_target_class_is_open(models, image, text, term,
                                                                                        pick):
    """Preset plus (every spatial term) on texts with no object noun, among three whole objects (the red box, the
    blue box, a small box between them): the open class ranks all three, the words pick, and the warning says so."""
    boxes = np.zeros((3, 45, 67), bool)
    boxes[0, 5:30, 4:25], boxes[1, 10:40, 40:60], boxes[2, 34:42, 28:36] = True, True, True
    with pytest.warns(RefDiffWarning, match="the target class is open"):
        results = make(models, preset="plus").segment_variants(image, text, ["full"], proposals=boxes)
    r = results["full"]
    assert r.mask.shape == (45, 67) and r.index == pick and len(r.warnings) == 1
    assert f"spatial_{term}" in r.scores and float(np.abs(r.scores[f"spatial_{term}"]).max()) > 0
    assert r.warnings[0].startswith(f"text {text!r} names no object, so the target class is open")
    assert "the spatial terms rank all whole-object candidates" in r.warnings[0]


@pytest.mark.parametrize("text", ["the second from the left", "the biggest one"])
def test_placeholder_texts_run_on_every_variant_with_sam(models, image, text):
    """The same texts with the tiny random SAM's own proposals (prompted, as plus asks), full and G: a mask of the
    image and the open-class warning first; any other warning is the pool's (random masks are no objects)."""
    with pytest.warns(RefDiffWarning, match="the target class is open"):
        results = make(models, preset="plus").segment_variants(image, text, ["full", "G"])
    for r in results.values():
        assert r.mask.shape == (45, 67) and r.index >= 0
        assert r.warnings[0].startswith(f"text {text!r} names no object, so the target class is open")
        assert all(w.startswith("pool: ") for w in r.warnings[1:])


@pytest.mark.parametrize("text", ["", " ... ", "?!"])
def test_empty_or_punctuation_only_text_is_refused_by_name(models, image, text):
    with pytest.raises(InputError, match=r"^text (is empty|'.+' holds only punctuation): give a referring expr"):
        make(models)(image, text, variant="G")


def test_sam_area_filter_follows_the_image_size(models, monkeypatch):
    """A 131 x 97 image with planted SAM masks: the official 10000 px scaled to the image keeps the objects."""
    import refdiff.proposals as proposals

    rgb = np.random.default_rng(2).integers(0, 255, (97, 131, 3), dtype=np.uint8)
    planted = torch.zeros(3, 97, 131, dtype=torch.bool)
    planted[0, :60, :50] = True  # 3000 px
    planted[1, 50:90, 60:98] = True  # 1520 px
    planted[2, :5, 120:] = True  # 55 px: below ~413.6 px
    monkeypatch.setattr(proposals, "sam_proposals", lambda generator, image: planted.clone())
    official = dict(sam_min_area=10000, sam_keep_largest=10)
    relative = make(models, **official)(rgb, "the box", variant="DS")  # default: sam_min_area_reference=307200
    assert relative.warnings == [] and (relative.proposals == planted[:2].numpy()).all()
    assert relative.index in (0, 1)
    with pytest.warns(RefDiffWarning, match="removed all 3 masks of this 131 x 97 image"):
        absolute = make(models, sam_min_area_reference=None, **official)(rgb, "the box", variant="DS")
    assert absolute.proposals.shape == (0, 97, 131) and absolute.index == -1 and not absolute.mask.any()
    assert len(absolute.warnings) == 1 and "sam_min_area_reference=307200" in absolute.warnings[0]
