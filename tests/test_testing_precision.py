"""refdiff.testing.precision on planted runs: the bounds by hand, and what a comparison accepts and refuses."""
from __future__ import annotations

import numpy as np
import pytest

from refdiff.testing.precision import (Outcome, compare_same_proposals, compare_threshold_proposals, threshold_bound,
                                       thresholds_of)


def test_threshold_bound_hand_values():
    c = np.array([0.1, 0.2, 0.8, 0.9], dtype=np.float32)
    assert threshold_bound(c, 0.5, 0.01) == pytest.approx(0.02)  # no pixel near 0.5: only the values move
    c = np.array([0.1, 0.2, 0.505, 0.8, 0.9], dtype=np.float32)
    # one band pixel; cores {0.8, 0.9} (mean 0.85) and {0.1, 0.2} (mean 0.15), two pixels each
    assert threshold_bound(c, 0.5, 0.01) == pytest.approx(0.02 + 2 * (0.345 / 2 + 0.355 / 2), rel=1e-5)
    assert threshold_bound(c, 0.95, 0.01) == float("inf")  # nothing above: the proposal may vanish
    assert thresholds_of(c >= 0.5, c, (0.3, 0.5, 0.6)) == [0.3, 0.5]
    assert thresholds_of(c >= 0.85, c, (0.3, 0.5, 0.85)) == [0.85]


def _run(fused, index, s_d=None, proposals=None) -> Outcome:
    props = proposals if proposals is not None else np.eye(3, dtype=bool)
    fused = np.asarray(fused, dtype=np.float32)
    return Outcome(mask=props[index], proposals=props, scores={"generative": None, "discriminative":
                   np.asarray(s_d if s_d is not None else fused, dtype=np.float32), "fused": fused},
                   index=index, attention=None)


def test_same_proposals_decided_and_tied():
    ref = _run([0.5, 0.2, 0.1], 0)
    assert compare_same_proposals(ref, _run([0.5001, 0.2, 0.1], 0), (1.0, 1.0), 0.0, 1e-3) is True
    with pytest.raises(AssertionError, match="chose 1"):  # a clear gap: the other run must choose 0
        compare_same_proposals(ref, _run([0.5, 0.2, 0.1], 1), (1.0, 1.0), 0.0, 1e-3)
    with pytest.raises(AssertionError, match="s_D moved"):
        compare_same_proposals(ref, _run([0.5, 0.2, 0.3], 0), (1.0, 1.0), 0.0, 1e-3)
    tied = _run([0.5, 0.4995, 0.1], 0)
    assert compare_same_proposals(tied, _run([0.4996, 0.4998, 0.1], 1), (1.0, 1.0), 0.0, 1e-3) is False
    with pytest.raises(AssertionError, match="proposals"):
        compare_same_proposals(ref, _run([0.5, 0.2, 0.1], 0, proposals=np.eye(3, dtype=bool)[::-1]), (1.0, 1.0),
                               0.0, 1e-3)


def test_threshold_proposals_may_differ_only_in_their_band():
    c = np.linspace(0.0, 1.0, 101, dtype=np.float32).reshape(1, 101)
    ref_props = np.stack([c >= np.float32(0.5), c >= np.float32(0.8)])
    ref = Outcome(mask=ref_props[0], proposals=ref_props, index=0, attention=c,
                  scores={"generative": np.zeros(2, np.float32), "discriminative": None,
                          "fused": np.zeros(2, np.float32)})
    near = ref_props.copy()
    near[0, 0, 49] = True  # c = 0.49: within 0.011 of 0.5
    got = Outcome(mask=near[0], proposals=near, index=0, attention=c, scores=ref.scores)
    compare_threshold_proposals(ref, got, (0.5, 0.8), 0.011)
    far = ref_props.copy()
    far[0, 0, 30] = True  # c = 0.3: far from 0.5
    with pytest.raises(AssertionError, match="away from the threshold"):
        compare_threshold_proposals(ref, Outcome(mask=far[0], proposals=far, index=0, attention=c,
                                                 scores=ref.scores), (0.5, 0.8), 0.011)
