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


# What training's codebook line counts: the training-mode assignments of the batches since the last
# sample step (`sample.py usage` counts inference over a folder's images; the two can differ).
TRAINING_COUNTED = "in training mode over these steps' batches"


def summary(counts, counted=None):
    """One line: codes used, perplexity, the most used code's share. counted says what the counts
    are of, after "codes used": e.g. "in inference over the 420 images of DIR" or "in training
    mode over these steps' batches" (the two differ: a reader must know which one this is)."""
    p = counts / max(counts.sum(), 1)
    used = f"{int((counts > 0).sum())} of {len(counts)} codes used" + (f" {counted}" if counted else "")
    return (f"{used}, perplexity {counts_perplexity(counts):.1f}, "
            f"most used code {int(counts.argmax())} at {100 * p.max():.1f}%")


def histogram_text(counts, width=40):
    """Text histogram, one line per code: index, count, share and a bar."""
    total, top = max(counts.sum(), 1), max(counts.max(), 1)
    return "\n".join(f"{k:5d} {c:9d} {100 * c / total:6.2f}% {'#' * int(round(width * c / top))}"
                     for k, c in enumerate(counts))


def _nice(x):
    """The smallest 1, 2 or 5 times a power of ten that is >= x (axis ranges and tick steps)."""
    if x <= 1:
        return 1
    power = 10 ** int(np.floor(np.log10(x)))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= x)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def histogram_image(counts, title="code usage", subtitle=None, plot_width=768, plot_height=240):
    """A bar chart of code counts as a uint8 RGB image, to be read without this docstring: code
    index along x, count along y (both with ticks), a title, a line with used and dead codes and
    the perplexity (and subtitle: what was counted), unused codes marked red under the axis.
    More codes than plot_width pixels share a bar (its count is their sum)."""
    from PIL import Image, ImageDraw

    counts = np.asarray(counts, np.int64)
    k = len(counts)
    per_bar = -(-k // plot_width)  # codes per bar
    bars = np.zeros(-(-k // per_bar) * per_bar, np.int64)
    bars[:k] = counts
    bars = bars.reshape(-1, per_bar)
    bar_counts, dead_bars = bars.sum(1), (bars == 0).all(1)
    bar_width = max(1, plot_width // len(bar_counts))
    width = bar_width * len(bar_counts)
    top = _nice(max(int(bar_counts.max()), 1))

    font = _font()
    left, right, upper, lower = 70, 24, 64, 48
    image = Image.new("RGB", (left + max(width, 360) + right, upper + plot_height + lower), "white")
    draw = ImageDraw.Draw(image)
    x0, y0 = left, upper + plot_height  # the origin, in pixels
    used = int((counts > 0).sum())
    lines = [title, f"{used} of {k} codes used, {k - used} dead (red), perplexity {counts_perplexity(counts):.1f}"
             + (f"; {subtitle}" if subtitle else "")]
    draw.text((x0, 6), lines[0], fill="black", font=font)
    draw.text((x0, 24), lines[1], fill=(60, 60, 60), font=font)
    ticks = range(0, top + 1, _nice(top / 5))
    for value in ticks:  # a light grid behind the bars
        y = y0 - round(plot_height * value / top)
        draw.line([x0, y, x0 + width, y], fill=(225, 225, 225))
    for i, (c, dead) in enumerate(zip(bar_counts, dead_bars)):
        x = x0 + i * bar_width
        gap = 1 if bar_width > 3 else 0
        if dead:
            draw.rectangle([x, y0 + 2, x + bar_width - 1 - gap, y0 + 5], fill=(220, 40, 40))
        elif c:
            h = max(1, round(plot_height * c / top))
            draw.rectangle([x, y0 - h, x + bar_width - 1 - gap, y0 - 1], fill=(60, 90, 170))
    # y axis: counts, with ticks
    for value in ticks:
        y = y0 - round(plot_height * value / top)
        draw.line([x0 - 4, y, x0, y], fill="black")
        label = f"{value:,}"
        draw.text((x0 - 8 - draw.textlength(label, font=font), y - 7), label, fill="black", font=font)
    draw.line([x0, y0, x0, upper], fill="black")
    draw.text((8, upper - 18), "count", fill="black", font=font)
    # x axis: code index, a tick at the middle of the bar holding each labelled code
    draw.line([x0, y0, x0 + width, y0], fill="black")
    step = _nice(k / 12)
    for code in range(0, k, step):
        x = x0 + (code // per_bar) * bar_width + bar_width // 2
        draw.line([x, y0 + 6, x, y0 + 10], fill="black")
        label = str(code)
        draw.text((x - draw.textlength(label, font=font) / 2, y0 + 12), label, fill="black", font=font)
    label = "code index" + (f" ({per_bar} codes per bar)" if per_bar > 1 else "")
    draw.text((x0 + width / 2 - draw.textlength(label, font=font) / 2, y0 + 30), label, fill="black", font=font)
    return np.asarray(image)
