"""Codebook health: k-means initialisation and code-usage summaries (NumPy)."""

import numpy as np

KMEANS_ITERATIONS = 10


def kmeans(points, k, iterations=KMEANS_ITERATIONS, seed=0):
    """(n, dim) points -> (k, dim) centroids after Lloyd iterations from k distinct random points.

    A cluster left empty is moved onto the point farthest from its centroid, so with at least k
    distinct points every centroid owns at least one point at the end.
    """
    points = np.asarray(points, np.float64)
    rng = np.random.default_rng(seed)
    distinct = np.unique(points, axis=0)
    if len(distinct) < k:
        raise ValueError(f"k-means needs at least {k} distinct vectors, got {len(distinct)}")
    centroids = distinct[rng.choice(len(distinct), k, replace=False)]
    for _ in range(iterations):
        owner, _ = _assign_and_fill_empty(points, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, owner, points)
        counts = np.bincount(owner, minlength=k)
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    for _ in range(k):  # a moved centroid can empty another cluster: repeat until none is empty
        _, moved = _assign_and_fill_empty(points, centroids)
        if not moved:
            break
    return centroids.astype(np.float32)


def _assign_and_fill_empty(points, centroids):
    """Nearest centroid of each point; centroids owning no point move (in place) onto the points
    farthest from their centroids, distinct ones. Returns (owner, whether any moved)."""
    distances = (points ** 2).sum(1, keepdims=True) - 2 * points @ centroids.T + (centroids ** 2).sum(1)
    owner = distances.argmin(1)
    empty = np.flatnonzero(np.bincount(owner, minlength=len(centroids)) == 0)
    if len(empty):
        farthest = np.argsort(-distances[np.arange(len(points)), owner], kind="stable")
        _, first = np.unique(points[farthest], axis=0, return_index=True)
        centroids[empty] = points[farthest[np.sort(first)[:len(empty)]]]
    return owner, len(empty) > 0


def usage_counts(codes, num_codes):
    """How often each code occurs in an int array of codes: (num_codes,) int64."""
    return np.bincount(np.asarray(codes).ravel(), minlength=num_codes)


def counts_perplexity(counts):
    """exp(entropy) of a code histogram (num_codes,): num_codes when all are used equally; 0 if empty."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0


def summary(counts):
    """One line: codes used, perplexity, the most used code's share."""
    p = counts / max(counts.sum(), 1)
    return (f"{int((counts > 0).sum())} of {len(counts)} codes used, perplexity {counts_perplexity(counts):.1f}, "
            f"most used code {int(counts.argmax())} at {100 * p.max():.1f}%")


def histogram_text(counts, width=40):
    """Text histogram, one line per code: index, count, share and a bar."""
    total, top = max(counts.sum(), 1), max(counts.max(), 1)
    return "\n".join(f"{k:5d} {c:9d} {100 * c / total:6.2f}% {'#' * int(round(width * c / top))}"
                     for k, c in enumerate(counts))


def histogram_image(counts, bar_width=8, height=200):
    """A bar chart of code counts as a uint8 RGB image: one bar per code, unused codes marked red."""
    k = len(counts)
    image = np.full((height + 8, k * bar_width + 8, 3), 255, np.uint8)
    heights = np.round(height * counts / max(counts.max(), 1)).astype(int)
    for i, h in enumerate(heights):
        left = 4 + i * bar_width
        if counts[i] == 0:
            image[height:height + 4, left:left + bar_width - 1] = (220, 40, 40)
        else:
            image[height + 4 - h:height + 4, left:left + bar_width - 1] = (60, 90, 170)
    return image
