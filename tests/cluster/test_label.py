"""core.label: c-TF-IDF cluster names against a hand-built example and a plain-Python brute force."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from core.label import STOP_WORDS, TOKEN_PATTERN, cluster_labels, ctfidf_scores

NOISE = "stock photo free download"


def shapes_example() -> tuple[list[str | None], np.ndarray]:
    """Three clusters (red triangles, blue stars, green circles) buried in alt-text noise."""
    captions: list[str | None] = []
    labels: list[int] = []
    for cid, (colour, shape) in enumerate([("red", "triangle"), ("blue", "star"), ("green", "circle")]):
        captions += [
            f"{colour} {shape} {colour} {shape} {colour} {NOISE}",
            f"{shape} {colour} {shape} {colour} {colour} on white background, hd image",
            f"A {colour} {shape} {colour} - {NOISE} jpg",
        ]
        labels += [cid] * 3
    return captions, np.array(labels)


def brute_ctfidf(captions: list[str | None], labels: np.ndarray, k: int) -> dict[tuple[int, str], float]:
    """Eq. (1) of BERTopic with dicts and loops (min_df = 1): {(cluster, term): score}."""
    counts = [Counter[str]() for _ in range(k)]
    for text, c in zip(captions, labels, strict=True):
        if isinstance(text, str):
            counts[c].update(t for t in re.findall(TOKEN_PATTERN, text.lower()) if t not in STOP_WORDS)
    sizes = [sum(cnt.values()) for cnt in counts]
    avg = sum(sizes) / sum(1 for s in sizes if s > 0)
    total = Counter[str]()
    for cnt in counts:
        total.update(cnt)
    return {
        (c, t): n / sizes[c] * math.log(1 + avg / total[t]) for c in range(k) for t, n in counts[c].items()
    }


def test_names_the_shapes_in_order_without_noise() -> None:
    captions, labels = shapes_example()
    assert cluster_labels(captions, labels, 3, top_n=2) == ["red triangle", "blue star", "green circle"]
    for name in cluster_labels(captions, labels, 3, top_n=10, min_df=1):
        assert name and not set(name.split()) & STOP_WORDS


def test_empty_cluster_none_captions_and_bad_bytes() -> None:
    captions, labels = shapes_example()
    captions = [*captions, None, None, "caf\ufffd\ufffd", "\ufffd\ufffd"]
    labels = np.concatenate([labels, [3, 0, 3, 3]])  # cluster 4 has no rows; 3 only junk
    names = cluster_labels(captions, labels, 5, top_n=2, min_df=1)
    assert names[:3] == ["red triangle", "blue star", "green circle"]
    assert names[3] == "caf" and names[4] == ""
    assert cluster_labels(captions, labels, 5, top_n=2, min_df=2)[3:] == ["", ""]


@pytest.mark.parametrize("k", [2, 4])
def test_scores_match_brute_force(k: int) -> None:
    captions: list[str | None] = [
        "a dog on grass",
        "Dog, dog and CAT!",
        None,
        "grass field stock photo",
        "cat cat sofa",
        "sofa in a room 2020",
        "dog",
    ]
    labels = np.array([0, 0, 1, 1, 1, 0, 1]) if k == 2 else np.array([0, 0, 1, 3, 1, 3, 0])
    scores, vocab = ctfidf_scores(captions, labels, k)
    assert scores.shape == (k, len(vocab)) and vocab == sorted(vocab)
    expected = brute_ctfidf(captions, labels, k)
    dense = scores.toarray()
    assert {(c, vocab[t]) for c, t in zip(*np.nonzero(dense), strict=True)} == set(expected)
    for (c, term), value in expected.items():
        assert dense[c, vocab.index(term)] == pytest.approx(value, rel=1e-12)


def test_term_in_every_cluster_scores_low() -> None:
    """Same count in its cluster, but 'sunset' is everywhere: idf pushes it below the distinct word."""
    captions = [
        "sunset lake",
        "sunset lake",
        "sunset desert",
        "sunset desert",
        "sunset forest",
        "sunset forest",
    ]
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores, vocab = ctfidf_scores(captions, labels, 3)
    dense = scores.toarray()
    s = vocab.index("sunset")
    for c, word in enumerate(["lake", "desert", "forest"]):
        assert dense[c, s] < dense[c, vocab.index(word)]
    assert cluster_labels(captions, labels, 3, top_n=1) == ["lake", "desert", "forest"]


def test_no_usable_words_and_unassigned_rows() -> None:
    assert cluster_labels(["stock photo", None, "the a 123"], np.array([0, 1, 1]), 2) == ["", ""]
    names = cluster_labels(["red car", "red car", "blue sky"], np.array([0, 0, -1]), 2, min_df=1)
    assert names == ["car red", ""]


def test_bad_arguments_fail_loudly() -> None:
    with pytest.raises(DataError, match="out of range"):
        cluster_labels(["a b"], np.array([2]), 2)
    with pytest.raises(DataError, match="shape"):
        cluster_labels(["a b", "c d"], np.array([0]), 2)
    with pytest.raises(ConfigError, match="top_n"):
        cluster_labels(["a b"], np.array([0]), 1, top_n=0)
    with pytest.raises(ConfigError, match="k must"):
        cluster_labels([], np.array([], dtype=int), 0)
