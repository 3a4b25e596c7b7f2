"""Image folders in, batches of [-1, 1] float32 images out.

Each image is read as RGB (any mode or bit depth, EXIF orientation honoured), resized to
img_dim x img_dim with bilinear filtering (no crop) and scaled with x / 255 * 2 - 1, as the
reference. Training batches follow the reference's epochs: the file list is shuffled every
epoch (seeded by (seed, epoch), so a resumed run sees the same order) and an epoch is
ceil(N / batch_size) steps, the last batch smaller.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from .errors import UsageError, warn
from .io import save_npz, write_failed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))  # PIL releases the GIL while decoding


def find_images(folder):
    """Image files under folder, recursively, by extension, sorted."""
    if not os.path.isdir(folder):
        raise UsageError(f"{'not a folder' if os.path.exists(folder) else 'no such folder'}: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


# Greyscale modes beyond 8 bits, scaled to 0..255 by the range the mode declares, never by the
# data (a dark frame stays dark): 16-bit /257, "I" (signed 32-bit) by 2**31 - 1 (negatives are
# black). Float ("F") images are taken to be in [0, 1], the usual convention; outside is clipped.
_FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 2 ** 31 - 1, "F": 1.0}


def _full_scale(img):
    """The value that maps to white in a wide greyscale image. Pillow < 11 opens 16-bit PNGs as "I"
    (32-bit), so the raw mode of the file's data, not the mode, tells 16 from 32 bits."""
    if img.mode == "I" and any("I;16" in str(t[3]) for t in img.tile):
        return 65535
    return _FULL_SCALE[img.mode]


def _to_rgb(img):
    wide = _full_scale(img) if img.mode in _FULL_SCALE else None  # before exif_transpose drops img.tile
    img = ImageOps.exif_transpose(img)
    if wide is not None:
        a = np.asarray(img, np.float64) * (255.0 / wide)
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
    return img.convert("RGB")


def read_pixels(path, img_dim):
    """One file -> (img_dim, img_dim, 3) uint8 RGB. Raises OSError/ValueError if unreadable."""
    with Image.open(path) as img:
        img = _to_rgb(img)
        img = img.resize((img_dim, img_dim), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def to_float(pixels):
    """uint8 pixels -> float32 in [-1, 1], the reference's x / 255 * 2 - 1."""
    return np.asarray(pixels, np.float32) / 255 * 2 - 1


def read_image(path, img_dim):
    """One file -> (img_dim, img_dim, 3) float32 in [-1, 1]. Raises OSError/ValueError if unreadable."""
    return to_float(read_pixels(path, img_dim))


def _try_read(path, img_dim, read=read_image):
    try:
        return read(path, img_dim), None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        return None, f"{type(e).__name__}: {e}"


def _looks_like_image(path):
    """Header check only (fast): the file opens as an image with a non-empty size."""
    try:
        with Image.open(path) as img:
            return img.size[0] > 0 and img.size[1] > 0
    except Exception:
        return False


def _summarise_skips(skipped, what):
    if skipped:
        warn(f"skipped {len(skipped)} {what} (first: {skipped[0]})")


def epoch_batches(n, batch_size, seed, start_step=0):
    """Endless index batches over n items: each epoch a fresh permutation seeded by (seed, epoch),
    ceil(n / batch_size) batches, the last smaller. Starts at global step start_step."""
    steps = math.ceil(n / batch_size)
    epoch, skip = divmod(start_step, steps)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(skip, steps):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch, skip = epoch + 1, 0


def check_img_dim(img_dim):
    if isinstance(img_dim, bool) or not isinstance(img_dim, (int, np.integer)) or img_dim < 1:
        raise UsageError(f"img_dim must be a positive integer, got {img_dim!r}")
    return int(img_dim)


def load_images(paths_or_dir, img_dim):
    """A folder or a list of files -> float32 (N, img_dim, img_dim, 3) in [-1, 1].
    Unreadable files are skipped with one warning; none readable is a UsageError."""
    img_dim = check_img_dim(img_dim)
    paths = find_images(paths_or_dir) if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    results = list(_pool.map(lambda p: _try_read(p, img_dim), paths))
    images = [image for image, _ in results if image is not None]
    if not images:
        raise UsageError(f"no readable images in {paths_or_dir} ({len(paths)} candidate files)")
    _summarise_skips([p for p, (image, _) in zip(paths, results) if image is None], "unreadable image files")
    return np.stack(images)


class ImageFolder:
    """The usable images of a folder, and the reference's shuffled epochs over them."""

    def __init__(self, folder, img_dim):
        self.folder, self.img_dim = folder, check_img_dim(img_dim)
        candidates = find_images(folder)
        looks_ok = list(_pool.map(_looks_like_image, candidates))
        self.paths = [p for p, ok in zip(candidates, looks_ok) if ok]
        skipped = [p for p, ok in zip(candidates, looks_ok) if not ok]
        if not self.paths:
            found = f"{len(skipped)} files are not readable images" if skipped else f"looked for {', '.join(IMAGE_EXTENSIONS)}"
            raise UsageError(f"no usable images in {folder} ({found})")
        _summarise_skips(skipped, "files that are not readable images")
        self.bad = set()  # files that passed the header check but failed to decode
        self.pixels = None  # (N, img_dim, img_dim, 3) uint8 once cached

    def class_labels(self):
        """(class names, (N,) int32 class of each image): an image's class is its first-level
        subfolder under the folder (the ImageFolder convention), names sorted."""
        parts = [os.path.relpath(p, self.folder).split(os.sep) for p in self.paths]
        loose = [os.path.join(*part) for part in parts if len(part) == 1]
        if loose:
            raise UsageError(f"--classes: {len(loose)} images are not in a class subfolder of {self.folder} "
                             f"(first: {loose[0]}); put each image in a folder named after its class")
        names = sorted({part[0] for part in parts})
        return names, np.array([names.index(part[0]) for part in parts], np.int32)

    def usable(self):
        """(N,) bool: the images not (yet) found unreadable."""
        if self.pixels is not None:
            return np.asarray(self.readable, bool)
        return np.array([p not in self.bad for p in self.paths])

    def cache(self, file=None, progress=True):
        """Decode and resize every image once and serve batches from memory from then on: the same
        batches as reading the files. With a file (.npz), the decoded images are kept there and
        reused while the folder's files (names, sizes, times) and img_dim are unchanged."""
        stats = [os.stat(p) for p in self.paths]
        signature = np.array([f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in zip(self.paths, stats)])
        if file and os.path.exists(file):
            try:
                with np.load(file) as archive:
                    if int(archive["img_dim"]) == self.img_dim and np.array_equal(archive["signature"], signature):
                        pixels, readable = archive["pixels"], archive["readable"]
                        if pixels.shape != (len(self.paths), self.img_dim, self.img_dim, 3) or \
                                readable.shape != (len(self.paths),):
                            raise ValueError(f"pixels of shape {pixels.shape} for {len(self.paths)} images")
                        self.pixels, self.readable = pixels, readable
                        self.bad = {p for p, ok in zip(self.paths, self.readable) if not ok}
                        return self
            except Exception as e:  # zip, pickle and key errors, a cut-off file: all mean "not a cache we wrote"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UsageError(f"cannot read image cache {file} ({reason}); delete it and it is made anew, "
                                 "or give another --cache file") from None
        results = list(tqdm(_pool.map(lambda p: _try_read(p, self.img_dim, read_pixels), self.paths),
                            total=len(self.paths), desc="caching", unit="image", disable=not progress))
        self.readable = np.array([pixels is not None for pixels, _ in results])
        if not self.readable.any():
            raise UsageError(f"no readable images in {self.folder}")
        self.bad = {p for p, ok in zip(self.paths, self.readable) if not ok}
        _summarise_skips(sorted(self.bad), "unreadable image files")
        blank = np.zeros((self.img_dim, self.img_dim, 3), np.uint8)  # stands in for unreadable files
        self.pixels = np.stack([blank if pixels is None else pixels for pixels, _ in results])
        if file:
            save_npz(file, pixels=self.pixels, readable=self.readable, signature=signature, img_dim=self.img_dim)
        return self

    def __len__(self):
        return len(self.paths)

    def steps_per_epoch(self, batch_size):
        return math.ceil(len(self.paths) / batch_size)

    def read_batch(self, indices):
        """Decode files in parallel; files that fail are dropped from the batch and remembered."""
        if self.pixels is not None:
            kept = [i for i in indices if self.readable[i]]
            return to_float(self.pixels[kept]) if kept else None
        paths = [self.paths[i] for i in indices if self.paths[i] not in self.bad]
        results = list(_pool.map(lambda p: _try_read(p, self.img_dim), paths))
        for path, (image, error) in zip(paths, results):
            if image is None:
                self.bad.add(path)
                warn(f"skipping unreadable image {path} ({error}); {len(self.bad)} skipped so far")
        images = [image for image, _ in results if image is not None]
        return np.stack(images) if images else None

    def batches(self, batch_size, seed, start_step=0):
        """Endless training batches from global step start_step on: epoch after epoch."""
        for indices in epoch_batches(len(self.paths), batch_size, seed, start_step):
            batch = self.read_batch(indices)
            if batch is not None:
                yield batch

    def dataset(self, batch_size, seed, start_step=0):
        """The batches of `batches` as a tf.data graph, decoded in parallel and prefetched."""
        return training_dataset(self.read_batch, len(self.paths), self.img_dim, batch_size, seed, start_step)

    def random_images(self, n, rng):
        """n images drawn at random (with replacement, as the reference's np.random.choice), decoded
        on the pool; a pick that turns out unreadable is drawn again. (n, img_dim, img_dim, 3)."""
        images = []
        while len(images) < n:
            usable = self.readable.any() if self.pixels is not None else len(self.bad) < len(self.paths)
            if not usable:
                raise UsageError(f"no readable images in {self.folder} to draw {n} from")
            batch = self.read_batch(rng.integers(0, len(self.paths), size=n - len(images)))
            if batch is not None:
                images.extend(batch)
        return np.stack(images)


class ImageArray:
    """Images already in memory, (N, d, d, 3) floats in [-1, 1], served like an ImageFolder."""

    def __init__(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or not len(images):
            raise UsageError(f"images must be an array (N, d, d, 3) with N >= 1, got shape {images.shape}")
        if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all() or np.abs(images).max() > 1:
            raise UsageError("images must be finite floats in [-1, 1] (x / 255 * 2 - 1)")
        self.images, self.img_dim = images.astype(np.float32, copy=False), images.shape[1]

    def __len__(self):
        return len(self.images)

    def steps_per_epoch(self, batch_size):
        return math.ceil(len(self.images) / batch_size)

    def read_batch(self, indices):
        return self.images[np.asarray(indices)]

    def random_images(self, n, rng):
        return self.images[rng.integers(0, len(self.images), size=n)]

    def dataset(self, batch_size, seed, start_step=0):
        return training_dataset(self.read_batch, len(self.images), self.img_dim, batch_size, seed, start_step)


def index_dataset(n, batch_size, seed, start_step=0):
    """epoch_batches as a tf.data graph: endless int64 index batches, each epoch a permutation
    seeded by (seed, epoch) (NumPy's, so the order is the same as epoch_batches), from global
    step start_step on."""
    import tensorflow as tf

    epoch, skip = divmod(start_step, math.ceil(n / batch_size))

    def permutation(e):
        return np.random.default_rng([seed, int(e)]).permutation(n).astype(np.int64)

    def one_epoch(e):
        order = tf.numpy_function(permutation, [e], tf.int64, stateful=False)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(order, [n])).batch(batch_size)

    return tf.data.Dataset.range(epoch, 2 ** 62).flat_map(one_epoch).skip(skip)


def training_dataset(read_batch, n, img_dim, batch_size, seed, start_step=0):
    """index_dataset -> read_batch(indices) (float32 (k, d, d, 3), or None when none could be
    read; k may be smaller: unreadable files are dropped) in parallel, in order -> prefetch.
    One step per element: the same batches, in the same order, as epoch_batches gives."""
    import tensorflow as tf

    def read(indices):
        batch = read_batch(indices)
        return np.zeros((0, img_dim, img_dim, 3), np.float32) if batch is None else batch

    def load(indices):
        images = tf.numpy_function(read, [indices], tf.float32, stateful=False)
        return tf.ensure_shape(images, (None, img_dim, img_dim, 3))

    ds = index_dataset(n, batch_size, seed, start_step)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(lambda images: tf.shape(images)[0] > 0).prefetch(tf.data.AUTOTUNE)


# The demo's palettes: few, well separated colours, so that 64 codes can spell every shape edge
# and a small prior, trained for two minutes, learns what a shape is rather than which colour comes next.
DEMO_BACKGROUNDS = np.array([(238, 232, 213), (147, 161, 161), (88, 110, 117), (7, 54, 66)], np.float64)
DEMO_SHAPE_COLOURS = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (181, 137, 0)]


def make_demo_images(folder, count=2000, size=64, seed=0):
    """Write `count` PNGs (size x size) of one filled circle, square or triangle on a vertical
    gradient between two background colours: the demo's built-in data set. The same seed writes
    the same files (existing ones are overwritten)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise write_failed(os.path.join(folder, "shape_00000.png"), e) from None
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)[:, None, None]
    for i in range(count):
        top, bottom = DEMO_BACKGROUNDS[rng.choice(len(DEMO_BACKGROUNDS), 2, replace=False)]
        img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).astype(np.uint8))
        colour = DEMO_SHAPE_COLOURS[rng.integers(len(DEMO_SHAPE_COLOURS))]
        cx, cy = rng.uniform(0.35, 0.65, 2) * size
        r = rng.uniform(0.2, 0.32) * size
        kind = rng.integers(3)
        draw = ImageDraw.Draw(img)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        path = os.path.join(folder, f"shape_{i:05d}.png")
        try:
            img.save(path)
        except OSError as e:
            raise write_failed(path, e) from None
    return folder
