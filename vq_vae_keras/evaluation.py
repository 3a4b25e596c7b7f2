"""The numbers to compare runs by: reconstruction PSNR and SSIM, codebook usage, the prior's
bits per dimension, and FID.

Reconstructions are scored as pictures: originals and reconstructions are mapped back to uint8 with
the reference's round((x + 1) / 2 * 255) (as the grids are), then MSE, PSNR and SSIM are computed per
image on the 0..255 scale and averaged over the images.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from . import backend
from .backend import sync_variables
from .callbacks import StepCallback, TensorBoardWriter, csv_text, log_rows_until
from .codebook import counts_perplexity, usage_counts
from .data import ImageFolder, load_images
from .errors import UsageError, warn
from .io import atomic_write_text, load_weights, to_uint8
from .models import level_names
from .priors.sampling import sample_codes, sample_levels
from .priors.tokens import codes_to_tokens, prior_nll
from .quantizers import LEVEL_SUFFIXES
from .run import LoadedRun, load_run

# An exact reconstruction (MSE 0) has infinite PSNR; it counts as this many dB, so that a mean stays
# finite. On uint8 images the highest finite PSNR is 10 log10(255^2 * 3 d^2): 95 dB at d = 128.
PSNR_CAP = 100.0
SSIM_FILTER_SIZE, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
INCEPTION_SIZE = 299

# The keys of evaluate()'s dict and of `sample.py evaluate`'s JSON; None where not computed.
KEYS = ("images", "psnr", "ssim", "mse", "psnr_unquantized", "ssim_unquantized", "codes_used",
        "codes_used_fraction", "perplexity", "codes_used_top", "codes_used_fraction_top", "perplexity_top", "prior_nll", "prior_nll_top", "prior_bits_per_dim",
        "prior_bits_per_image", "rfid", "fid",
        "fid_features", "fid_note")
# Keras's own download of InceptionV3's ImageNet weights without the top (as keras.applications asks for it).
IMAGENET_WEIGHTS = ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "bcbd6486424b2319ff4ef7d526e38f63")
RANDOM_FEATURES_NOTE = ("random Inception weights (--inception-weights none): rfid and fid test the pipeline only "
                        "and are not comparable with any other FID")


# ----------------------------------------------------------------------------- per-image scores

def mse(original, recon):
    """uint8 images (N, d, d, 3) -> (N,) float64 mean squared error per image, on the 0..255 scale."""
    diff = np.asarray(original, np.float64) - np.asarray(recon, np.float64)
    return (diff ** 2).reshape(len(diff), -1).mean(axis=1)


def psnr_from_mse(mse_values):
    """Per-image PSNR in dB: 10 log10(255^2 / MSE), PSNR_CAP where MSE is 0."""
    mse_values = np.asarray(mse_values, np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0 ** 2 / mse_values), PSNR_CAP)


def ssim(original, recon):
    """uint8 images (N, d, d, 3), d >= 11 -> (N,) float64 SSIM: an 11x11 Gaussian window of sigma 1.5,
    K1 0.01, K2 0.03, dynamic range 255, averaged over the valid window positions of each channel,
    then over the channels (tf.image.ssim)."""
    return tf.image.ssim(tf.constant(original, tf.float32), tf.constant(recon, tf.float32), max_val=255.0,
                         filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_SIGMA, k1=SSIM_K1, k2=SSIM_K2
                         ).numpy().astype(np.float64)


def reconstruction_scores(original, recon):
    """uint8 originals and reconstructions (N, d, d, 3) -> {"mse", "psnr", "ssim"}: (N,) arrays."""
    errors = mse(original, recon)
    return {"mse": errors, "psnr": psnr_from_mse(errors), "ssim": ssim(original, recon)}


# ----------------------------------------------------------------------------- Fréchet distance

def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance of two Gaussians, in float64: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    S1 S2 is not symmetric, but it has the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric
    positive semi-definite: the trace of the square root is the sum of the square roots of those.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def feature_statistics(features):
    """(N, dim) features -> their mean (dim,) and covariance (dim, dim), in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class InceptionFeatures:
    """The 2048-d average-pool features of keras.applications.InceptionV3 for uint8 images.

    weights: "imagenet" (Keras downloads them on first use into ~/.keras/models), the path of that
    download (inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5), or "none"/None: random
    weights, for testing the pipeline only (FIDs from them mean nothing).
    """

    def __init__(self, weights="imagenet", batch_size=32):
        self.batch_size = batch_size
        if weights in (None, "none"):
            weights = None
        elif weights == "imagenet":
            name, url, md5 = IMAGENET_WEIGHTS
            try:
                weights = keras.utils.get_file(name, url, cache_subdir="models", file_hash=md5)
            except Exception as e:  # get_file's failed download is a bare Exception; a bad hash ValueError
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"cannot get InceptionV3's ImageNet weights ({reason}); run once on a connected "
                                 "machine, or pass --inception-weights FILE.h5") from None
        elif not os.path.isfile(weights):
            raise UsageError(f"no Inception weights file at {weights}")
        model = keras.applications.InceptionV3(include_top=False, pooling="avg", weights=None,
                                               input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3))
        if weights is not None:
            load_weights(model, weights, "Inception weights")
        self.model = model
        # One trace for every batch size and image size (tracing InceptionV3 takes seconds). The
        # other backends call the network eagerly, on images TensorFlow resized.
        self._features = tf.function(self._features_eager, input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)]) \
            if backend.name() == "tensorflow" else self._features_eager

    def _features_eager(self, pixels):
        x = tf.image.resize(tf.cast(pixels, tf.float32), (INCEPTION_SIZE, INCEPTION_SIZE), method="bilinear")
        if backend.name() != "tensorflow":
            x = x.numpy()
        with backend.no_grad():
            return self.model(keras.applications.inception_v3.preprocess_input(x), training=False)

    def __call__(self, pixels):
        """uint8 images (N, d, d, 3) -> (N, 2048) float64."""
        return np.concatenate([keras.ops.convert_to_numpy(self._features(pixels[i:i + self.batch_size]))
                               for i in range(0, len(pixels), self.batch_size)]).astype(np.float64)


# ----------------------------------------------------------------------------- evaluate

def _image_batches(images_or_folder, img_dim, batch_size):
    """(batches of float32 images (B, d, d, 3) in [-1, 1], how many batches) from a folder (read in
    order; unreadable files skipped with a warning) or from an array."""
    if isinstance(images_or_folder, (str, os.PathLike)):
        folder = ImageFolder(os.fspath(images_or_folder), img_dim)
        starts = range(0, len(folder), batch_size)
        batches = (folder.read_batch(range(i, min(i + batch_size, len(folder)))) for i in starts)
        return (b for b in batches if b is not None), len(starts)
    try:
        images = np.asarray(images_or_folder, np.float32)
    except (TypeError, ValueError):
        raise UsageError(f"images must be a folder or an array of floats, got {type(images_or_folder).__name__}") from None
    if images.ndim != 4 or images.shape[1:] != (img_dim, img_dim, 3) or not len(images):
        raise UsageError(f"images have shape {images.shape}; this run needs (N, {img_dim}, {img_dim}, 3) in [-1, 1]")
    if not np.isfinite(images).all() or np.abs(images).max() > 1:
        raise UsageError("images must be finite floats in [-1, 1] (x / 255 * 2 - 1)")
    starts = range(0, len(images), batch_size)
    return (images[i:i + batch_size] for i in starts), len(starts)


def evaluate(run, images_or_folder, batch_size=64, fid=None, inception_weights="imagenet", seed=0, progress=True):
    """Scores of a run on held-out images: a dict with the keys in KEYS (None where not computed).

    run: a run directory or a loaded run (`load_run`). images_or_folder: a folder of images or a
    float array (N, img_dim, img_dim, 3) in [-1, 1].
    - images: how many were scored.
    - mse, psnr, ssim: each image through encoder -> quantizer -> decoder, per image on the 0..255
      scale (see `reconstruction_scores`), averaged over images. psnr_unquantized, ssim_unquantized:
      encoder -> decoder without the choice of codes (`VQVAE.unquantized`: z itself, the reference's
      test_ae_1; FSQ's channels unrounded; Gumbel's mixture without noise).
    - codes_used, codes_used_fraction (of num_codes), perplexity (exp of the entropy of the code
      histogram): over all code positions of all images. A two-level run (levels 2) also has
      codes_used_top, codes_used_fraction_top and perplexity_top, its top level's.
    - prior_nll: the prior's mean negative log-likelihood per code of the images' code maps, in nats;
      prior_bits_per_dim: each image's total code NLL / (img_dim^2 * 3) / ln 2, averaged over images
      (= prior_nll * h * w / (img_dim^2 * 3) / ln 2); prior_bits_per_image: the same total, in bits
      per image. Only when the run has an unconditional prior (a class-conditional one would need
      each image's class: left out, with a warning). A two-level run: prior_nll is the bottom
      prior's (under each image's top codes), prior_nll_top the top prior's, and the bits sum both
      levels; only when both priors are trained.
    - with fid=N: rfid, the Fréchet Inception distance of the reconstructions to the originals (all
      images), and fid, of N samples from the prior (drawn with seed) to the originals; fid_features
      says which Inception features they compare: "imagenet", or "random" (inception_weights "none":
      the numbers test the pipeline only and compare with nothing; fid_note says so).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if fid is not None and (isinstance(fid, bool) or not (isinstance(fid, (int, np.integer)) and fid >= 2)):
        raise UsageError(f"the number of FID samples must be an integer >= 2, got {fid}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 31:
        raise UsageError(f"seed must be an integer in [0, {2 ** 31 - 1}], got {seed!r}")
    if inception_weights is not None and not isinstance(inception_weights, (str, os.PathLike)):
        raise UsageError(f"inception_weights must be \"imagenet\", \"none\" or a file, got {inception_weights!r}")
    if not isinstance(run, (LoadedRun, str, os.PathLike)):
        raise UsageError(f"run must be a run directory or a loaded run (load_run), got {type(run).__name__}")
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    config, vqvae = run.config, run.vqvae
    two, conditional = config.levels == 2, config.classes is not None
    # A class-conditional prior would need each image's class; a two-level run's bottom prior is
    # never class-conditional (its top prior is), and the bits need both levels' NLL.
    score_bottom = run.prior is not None and (two or not conditional)
    score_top = two and run.top_prior is not None and not conditional
    scores_prior = score_bottom and (score_top or not two)
    if conditional and (run.prior is not None or run.top_prior is not None):
        left_out = "prior_nll_top, prior_bits_per_dim and prior_bits_per_image" if two else \
            "prior_nll, prior_bits_per_dim and prior_bits_per_image"
        warn(f"the {'top ' if two else ''}prior is class-conditional: {left_out} are left out (they need each image's class)")
    batches, num_batches = _image_batches(images_or_folder, config.img_dim, batch_size)
    inception = InceptionFeatures(inception_weights) if fid else None  # fails here, before the long part

    per_image = {key: [] for key in ("mse", "psnr", "ssim", "psnr_unquantized", "ssim_unquantized")}
    levels = [layer.num_codes for layer in vqvae.vq_layers]
    counts = [np.zeros(num_codes, np.int64) for num_codes in levels]
    nll_sums, real_features, recon_features = [0.0, 0.0], [], []
    for images in tqdm(batches, total=num_batches, desc="evaluating", unit="batch", disable=not progress):
        z = vqvae.encode(images, batch_size)
        codes, vectors = vqvae.quantize(z, batch_size)
        original, recon = to_uint8(images), to_uint8(vqvae.decode(vectors, batch_size))
        for key, values in reconstruction_scores(original, recon).items():
            per_image[key].append(values)
        unquantized = reconstruction_scores(original, to_uint8(vqvae.decode(vqvae.unquantized(z), batch_size)))
        per_image["psnr_unquantized"].append(unquantized["psnr"])
        per_image["ssim_unquantized"].append(unquantized["ssim"])
        for level_counts, level_codes in zip(counts, codes if len(levels) > 1 else [codes]):
            level_counts += usage_counts(level_codes, len(level_counts))
        if score_bottom and two:  # the bottom maps under their top maps
            nll_sums[0] += prior_nll(run.prior, codes_to_tokens(codes[0]), top_codes=codes[1].reshape(len(images), -1)) \
                * codes[0].size
        elif score_bottom:
            nll_sums[0] += prior_nll(run.prior, codes_to_tokens(codes)) * codes.size
        if score_top:
            nll_sums[1] += prior_nll(run.top_prior, codes_to_tokens(codes[1])) * codes[1].size
        if inception:
            real_features.append(inception(original))
            recon_features.append(inception(recon))

    if not per_image["mse"]:
        raise UsageError(f"no readable images in {images_or_folder}")
    per_image = {key: np.concatenate(values) for key, values in per_image.items()}
    results = dict.fromkeys(KEYS)
    results.update(images=len(per_image["mse"]), **{key: float(v.mean()) for key, v in per_image.items()})
    for suffix, level_counts in zip(LEVEL_SUFFIXES, counts):
        results.update({"codes_used" + suffix: int((level_counts > 0).sum()),
                        "codes_used_fraction" + suffix: float((level_counts > 0).mean()),
                        "perplexity" + suffix: counts_perplexity(level_counts)})
    if score_bottom:
        results["prior_nll"] = nll_sums[0] / counts[0].sum()
    if score_top:
        results["prior_nll_top"] = nll_sums[1] / counts[1].sum()
    if scores_prior:
        results["prior_bits_per_image"] = sum(nll_sums) / results["images"] / math.log(2)
        results["prior_bits_per_dim"] = results["prior_bits_per_image"] / (config.img_dim ** 2 * 3)
    if fid:
        random_features = inception_weights in (None, "none")
        results.update(fid_features="random" if random_features else "imagenet",
                       fid_note=RANDOM_FEATURES_NOTE if random_features else None)
        if results["images"] < 2:
            raise UsageError(f"FID needs at least 2 images, got {results['images']}")
        real = feature_statistics(np.concatenate(real_features))
        results["rfid"] = frechet_distance(*real, *feature_statistics(np.concatenate(recon_features)))
        if run.prior is None or (two and run.top_prior is None):
            warn("the run has no prior: fid (samples vs images) is not computed, only rfid")
        else:
            if two:
                codes = sample_levels(run.top_prior, run.prior, fid, seed=seed, progress=progress)
            else:
                codes = sample_codes(run.prior, fid, config.grid_shape, seed=seed, progress=progress)
            samples = to_uint8(vqvae.decode(vqvae.codes_to_vectors(codes), batch_size))
            results["fid"] = frechet_distance(*real, *feature_statistics(inception(samples)))
    return results


# What each number is, for the printed table.
DESCRIPTIONS = {
    "images": "images scored",
    "psnr": "dB, through the quantizer (higher is better)",
    "ssim": "through the quantizer (1 is perfect)",
    "mse": "per pixel-channel, 0..255 scale",
    "psnr_unquantized": "dB, encoder -> decoder without the choice of codes",
    "ssim_unquantized": "encoder -> decoder without the choice of codes",
    "codes_used": "codes chosen at least once",
    "codes_used_fraction": "of num_codes",
    "perplexity": "exp(entropy) of code usage (num_codes at best)",
    "codes_used_top": "top level: codes chosen at least once",
    "codes_used_fraction_top": "top level: of top_num_codes",
    "perplexity_top": "top level: exp(entropy) of code usage",
    "prior_nll": "nats per code (lower is better)",
    "prior_nll_top": "top level: nats per code",
    "prior_bits_per_dim": "bits per pixel-channel",
    "prior_bits_per_image": "bits per image: all its codes (both levels')",
    "rfid": "Frechet Inception distance, reconstructions vs images",
    "fid": "Frechet Inception distance, prior samples vs images",
    "fid_features": "the Inception weights rfid and fid are computed with",
}


def format_table(results):
    """The results as aligned lines: name, value, what it means. Keys not computed are left out;
    FIDs of random Inception features are marked as not comparable, and the note follows."""
    random_features = results.get("fid_features") == "random"
    lines = []
    for key in KEYS:
        value = results.get(key)
        if value is None or key == "fid_note":
            continue
        text = value if isinstance(value, str) else f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        description = DESCRIPTIONS[key]
        if random_features and key in ("rfid", "fid"):
            description += " -- NOT COMPARABLE: random features"
        lines.append(f"{key:<23} {text:>12}  {description}")
    if random_features:
        lines.append(f"note: {RANDOM_FEATURES_NOTE}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- during training

class EvaluateEvery(StepCallback):
    """Every `every` training steps, and at the end of training, scores the VQ-VAE on held-out images
    and appends a row step, psnr, ssim, codes_used to csv_path (and, given tensorboard_dir, writes
    them as TensorBoard scalars eval/psnr, eval/ssim, eval/codes_used).

    images: a float array (N, img_dim, img_dim, 3) in [-1, 1] or a folder (read once). Steps count
    the batches this callback sees, from initial_step (a resumed run passes its step: rows of the
    CSV past it are dropped, the rest kept).
    """

    FIELDS = ("step", "psnr", "ssim", "codes_used")  # and codes_used_top for a two-level run

    def __init__(self, vqvae, images, every, csv_path, tensorboard_dir=None, initial_step=0, batch_size=64):
        super().__init__(initial_step)
        if every < 1:
            raise UsageError(f"evaluation interval must be >= 1 step, got {every}")
        if isinstance(images, (str, os.PathLike)):
            images = load_images(images, vqvae.config.img_dim)
        self.run, self.images = LoadedRun(vqvae.config, vqvae, None), images
        self.fields = (*self.FIELDS[:-1], *level_names(self.FIELDS[-1:], vqvae.config.levels))
        self.every, self.csv_path, self.tensorboard_dir = every, csv_path, tensorboard_dir
        self.step, self.last, self.batch_size = initial_step, None, batch_size
        self.rows = self._earlier_rows(initial_step)
        self.writer = None

    def _earlier_rows(self, initial_step):
        return log_rows_until(self.csv_path, initial_step) if initial_step else []

    def on_step(self, step, logs):
        if step % self.every == 0:
            sync_variables(self.model)
            self.evaluate_now()

    def on_train_end(self, logs=None):
        if self.last != self.step:
            self.evaluate_now()

    def evaluate_now(self):
        scores = evaluate(self.run, self.images, batch_size=self.batch_size, progress=False)
        row = {"step": self.step, **{key: scores[key] for key in self.fields[1:]}}
        self.rows.append(row)
        atomic_write_text(self.csv_path, csv_text(self.fields, self.rows))
        if self.tensorboard_dir:
            self._write_scalars(row)
        self.last = self.step

    def _write_scalars(self, row):
        if self.writer is None:
            self.writer = TensorBoardWriter(self.tensorboard_dir)
        self.writer.scalars(self.step, {f"eval/{key}": row[key] for key in self.fields[1:]})
        self.writer.flush()
