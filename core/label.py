"""Cluster names from captions: the top class-based TF-IDF (c-TF-IDF) terms of each cluster.

Array in, list out; no paths, no catalog. The captions of each cluster are treated as one document;
a term scores high in a cluster when it is frequent there and rare over all clusters. Ref: Grootendorst,
"BERTopic: Neural topic modeling with a class-based TF-IDF procedure" (2022), eq. (1).

Everything stays sparse: the (N, V) caption-term counts are summed into a (k, V) cluster-term matrix
with one sparse product, and the top terms are read from its non-zeros, so 1e6 captions and k = 50k
never build a dense k x V matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Words that say how an image was published, not what it shows (alt text of web-crawled pairs).
#: A word block, not a list literal (SIM905): ~90 quoted strings would be far harder to read and edit.
ALT_TEXT_NOISE = frozenset(
    """
    photo photos photograph photography picture pictures pic pics image images img imgs stock stocks
    free download downloads downloadable jpg jpeg png gif webp svg eps bmp tif tiff hd uhd fhd hq
    high quality resolution res background backgrounds isolated vector vectors illustration
    illustrations clipart royalty royalties license licensed premium shutterstock alamy
    getty istock dreamstime depositphotos adobe pixabay unsplash wallpaper wallpapers thumbnail
    thumb file files copyright www http https com net org html htm click sale buy shop online
    new best top px dpi
    """.split()  # noqa: SIM905
)

#: Removed before scoring: scikit-learn's English stop words plus :data:`ALT_TEXT_NOISE`.
STOP_WORDS: frozenset[str] = frozenset(ENGLISH_STOP_WORDS) | ALT_TEXT_NOISE

#: A word: two or more letters (any script), no digits or underscores, not glued to digits. The
#: replacement character U+FFFD left by bad UTF-8 is not a letter, so it only ever splits words.
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{2,}\b"


def ctfidf_scores(
    captions: Sequence[str | None], labels: np.ndarray, k: int, *, min_df: int = 1
) -> tuple[sp.csr_matrix, list[str]]:
    """Class-based TF-IDF of every term in every cluster.

    For cluster c and term t, with counts taken after lower-casing, tokenising (:data:`TOKEN_PATTERN`)
    and dropping :data:`STOP_WORDS` and terms found in fewer than ``min_df`` captions:
    ``W[c, t] = tf[c, t] * log(1 + A / f[t])``, where ``tf[c, t]`` is the count of t in c divided by
    the number of counted terms in c, ``f[t]`` the count of t over all clusters and A the average
    number of counted terms per cluster (over clusters with at least one). Ref: Grootendorst,
    BERTopic (2022), eq. (1).

    Args:
        captions: (N,) caption per row; ``None`` (or any non-string, e.g. a pandas NaN) is ignored.
        labels: (N,) cluster id per row in [0, k); negative ids (unassigned) are ignored.
        k: number of clusters.
        min_df: a term must occur in at least this many captions.

    Returns:
        ``(W, vocab)``: W is a (k, V) float64 CSR matrix, larger = more characteristic of the
        cluster, zero where the term does not occur; vocab (V,) the terms, sorted, in column order.
        Empty clusters are all-zero rows; with no usable word at all, V is 0.
    """
    counts, vocab = _cluster_term_counts(captions, labels, k, min_df=min_df)
    counts = counts.astype(np.float64)
    per_cluster = np.asarray(counts.sum(axis=1)).ravel()
    used = per_cluster > 0
    if not used.any():
        return sp.csr_matrix((k, len(vocab)), dtype=np.float64), vocab
    avg_terms = per_cluster[used].mean()
    term_total = np.asarray(counts.sum(axis=0)).ravel()
    idf = np.log1p(avg_terms / np.maximum(term_total, 1.0))  # every kept term has term_total >= 1
    inv_rows = np.divide(1.0, per_cluster, out=np.zeros_like(per_cluster), where=used)
    scores = sp.diags(inv_rows) @ counts @ sp.diags(idf)
    return sp.csr_matrix(scores), vocab


def cluster_labels(
    captions: Sequence[str | None], labels: np.ndarray, k: int, *, top_n: int = 3, min_df: int = 2
) -> list[str]:
    """A short name per cluster: its ``top_n`` c-TF-IDF terms, best first, joined by spaces.

    Args:
        captions: (N,) caption per row; ``None`` (or any non-string) is ignored.
        labels: (N,) cluster id per row in [0, k); negative ids (unassigned) are ignored.
        k: number of clusters.
        top_n: terms per name.
        min_df: a term must occur in at least this many captions (drops typos and one-off ids).

    Returns:
        (k,) names, e.g. ``"red triangle"``; ``""`` for an empty cluster or one without usable words.
        Ties are broken alphabetically. Ref: c-TF-IDF, Grootendorst, BERTopic (2022).
    """
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    scores, vocab = ctfidf_scores(captions, labels, k, min_df=min_df)
    return _top_terms(scores, vocab, top_n)


def _validate(captions: Sequence[str | None], labels: np.ndarray, k: int, min_df: int) -> np.ndarray:
    """Checks the arguments; returns labels as a 1-D int64 array."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if min_df < 1:
        raise ConfigError(f"min_df must be >= 1, got {min_df}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != len(captions):
        raise DataError(f"labels must have shape ({len(captions)},) like captions, got {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and lab.max() >= k:
        raise DataError(f"label {int(lab.max())} out of range for k={k} clusters")
    return lab


def _cluster_term_counts(
    captions: Sequence[str | None], labels: np.ndarray, k: int, *, min_df: int
) -> tuple[sp.csr_matrix, list[str]]:
    """(k, V) int64 term counts per cluster and the sorted vocabulary."""
    lab = _validate(captions, labels, k, min_df)
    rows = np.flatnonzero(lab >= 0)
    docs = [c if isinstance(c, str) else "" for c in (captions[int(i)] for i in rows)]
    vectorizer = CountVectorizer(
        lowercase=True, token_pattern=TOKEN_PATTERN, stop_words=sorted(STOP_WORDS), min_df=min_df
    )
    try:
        doc_term = vectorizer.fit_transform(docs)
    except ValueError:
        # scikit-learn raises when no term survives (only stop words, or fewer captions than
        # min_df); for naming that just means every name is empty, not an error.
        log.debug("cluster_labels: no usable words in %d captions", len(docs))
        return sp.csr_matrix((k, 0), dtype=np.int64), []
    vocab = [str(t) for t in vectorizer.get_feature_names_out()]
    member = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.int64), (lab[rows], np.arange(rows.size))), shape=(k, rows.size)
    )
    return sp.csr_matrix(member @ doc_term), vocab


def _top_terms(scores: sp.csr_matrix, vocab: list[str], top_n: int) -> list[str]:
    """Per row, the ``top_n`` columns with the largest positive score, joined by spaces."""
    scores = sp.csr_matrix(scores)
    scores.eliminate_zeros()
    k = scores.shape[0]
    row = np.repeat(np.arange(k), np.diff(scores.indptr))
    # Sort all non-zeros at once by (row, score descending, column): no per-row Python sort, and
    # ties fall to the alphabetically first term because the vocabulary is sorted.
    order = np.lexsort((scores.indices, -scores.data, row))
    rank = np.arange(order.size) - scores.indptr[row[order]]
    keep = order[rank < top_n]
    names: list[list[str]] = [[] for _ in range(k)]
    for r, c in zip(row[keep].tolist(), scores.indices[keep].tolist(), strict=True):
        names[r].append(vocab[c])
    return [" ".join(terms) for terms in names]


def vocabulary_labels(
    centroids: np.ndarray, name_embeddings: np.ndarray, names: Sequence[str], *, top_n: int = 3
) -> tuple[list[str], np.ndarray]:
    """Each cluster's best-matching names from a user vocabulary, through a CLIP text tower.

    A centroid of image embeddings lies in CLIP's joint space, so the names whose prompt embeddings
    have the highest cosine to it describe the cluster (zero-shot classification of the centroid;
    Radford et al. 2021).

    Args:
        centroids: (k, D) unit-norm centroids.
        name_embeddings: (V, D) unit-norm text embeddings of the names (e.g. averaged over prompts).
        names: (V,) the names.
        top_n: names per cluster, best first.

    Returns:
        ``(labels, score)``: (k,) names joined by ``", "``, and (k,) cosine of the best name.

    Raises:
        ConfigError: empty vocabulary, top_n < 1. DataError: widths or counts do not match.
    """
    if len(names) == 0:
        raise ConfigError("the vocabulary is empty; give at least one name")
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    if name_embeddings.shape[0] != len(names) or name_embeddings.shape[1] != centroids.shape[1]:
        raise DataError(f"{len(names)} names with embeddings {tuple(name_embeddings.shape)} do not fit "
                        f"centroids of width {centroids.shape[1]}")
    sims = np.asarray(centroids, np.float32) @ np.asarray(name_embeddings, np.float32).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :top_n]
    labels = [", ".join(names[j] for j in row) for row in top.tolist()]
    return labels, sims[np.arange(len(sims)), top[:, 0]].astype(np.float64)
