"""What the spatial terms cost per sentence on the CPU: the structured parse (spaCy) and the terms on N
candidate masks at a COCO image size, beside the paper's parse alone. Run: python -m benchmarks.spatial_cost"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from refdiff.config import PLUS, SPATIAL_TERMS
from refdiff.expression import parse_expression
from refdiff.spatial import negative_similarity, spatial_scores
from refdiff.text import load_spacy, parse_text

SENTENCES = ("the second man from the left", "the smallest cake", "the cup next to the laptop",
             "the guy holding the umbrella", "the person behind the fence", "the middle zebra in the picture")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(n: int = 10, height: int = 480, width: int = 640, repeats: int = 20) -> dict:
    torch.manual_seed(0)
    nlp = load_spacy()
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for i in range(n):
        y, x = (i * 37) % (height - 100), (i * 61) % (width - 120)
        masks[i, y:y + 60 + 4 * i, x:x + 80 + 3 * i] = True
    fused = torch.rand(n)
    other = torch.rand(height, width)
    feats, texts = torch.randn(n, 512), torch.randn(1, 512)
    rows = {}
    for text in SENTENCES:
        paper = _median_ms(lambda: parse_text(text, nlp=nlp), repeats)
        parse = _median_ms(lambda: parse_expression(text, nlp=nlp), repeats)
        expr = parse_expression(text, nlp=nlp)
        maps = {r.other: other for r in expr.relations}
        terms = _median_ms(lambda: spatial_scores(expr, masks, fused, PLUS, SPATIAL_TERMS, maps,
                                                  negative_similarity(feats, texts)), repeats)
        rows[text] = {"paper_parse_ms": round(paper, 2), "structured_parse_ms": round(parse, 2),
                      "terms_ms": round(terms, 2)}
    out = {"n_candidates": n, "image": [height, width], "threads": torch.get_num_threads(), "rows": rows}
    json.dump(out, sys.stdout, indent=1)
    print()
    return out


if __name__ == "__main__":
    main()
