"""Files on disk: atomic writes, image grids, weight files and resumable checkpoints.

Every file is written to a temporary name in the same folder and renamed into place, so a
kill at any moment leaves the previous version intact.
"""

import json
import os
import tempfile
import warnings

import numpy as np

from .errors import UsageError


def _atomic(path, write, suffix=""):
    """Call write(tmp_path), then rename tmp_path over path. suffix keeps an ending some writers need."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels, as the reference: round((x + 1) / 2 * 255)."""
    pixels = np.round((np.asarray(images, np.float64) + 1) / 2 * 255)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def tile(images, n):
    """(n*n, d, d, 3) images in [-1, 1], row-major -> one (n*d, n*d, 3) uint8 grid."""
    images = to_uint8(images)
    count, d = images.shape[0], images.shape[1]
    if count != n * n:
        raise ValueError(f"need {n * n} tiles for a {n}x{n} grid, got {count}")
    return images.reshape(n, n, d, d, 3).transpose(0, 2, 1, 3, 4).reshape(n * d, n * d, 3)


def save_png(path, grid):
    import imageio.v3 as iio

    _atomic(path, lambda tmp: iio.imwrite(tmp, grid, extension=".png"), suffix=".png")


def save_weights(model, path):
    """model.save_weights, atomically (Keras wants the name to end in .weights.h5)."""
    _atomic(path, model.save_weights, suffix=".weights.h5")


def save_model(model, path):
    """model.save to a .keras file, atomically."""
    _atomic(path, model.save, suffix=".keras")


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic(path, write)


def save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic(path, write)


def load_weights(model, path, what="weights"):
    """model.load_weights with a one-line UsageError for a missing, corrupt or mismatched file."""
    if not os.path.isfile(path):
        raise UsageError(f"no {what} at {path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
            error = None
        except Exception as e:  # h5py and Keras raise many kinds; all mean "this file does not fit"
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Keras only warns when parts of the file do not match; a half-loaded model is an error here.
    skipped = [str(w.message) for w in caught if "freshly-initialized" in str(w.message) or "Skipping" in str(w.message)]
    if error or skipped:
        raise UsageError(f"cannot load {what} from {path} (wrong config or corrupt file?): {error or skipped[0]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# Checkpoint: one .npz file with the model's variables, the optimizer's variables and a JSON state.
# Variables are matched by order, which is fixed by the model's construction from the saved config.

def _random_state(model):
    """Variables that are not weights: the states of the model's random seed generators."""
    weights = {w.path for w in model.weights}
    return [v for v in model.variables if v.path not in weights]


def save_checkpoint(path, model, optimizer, state):
    arrays = {f"model/{i}": np.asarray(v) for i, v in enumerate(model.get_weights())}
    arrays.update({f"random/{i}": np.asarray(v) for i, v in enumerate(_random_state(model))})
    arrays.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    save_npz(path, **arrays)


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer variables in place; return the saved state dict."""
    try:
        with np.load(path) as archive:
            files = dict(archive)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {e}") from None
    model_arrays = [files[f"model/{i}"] for i in range(sum(k.startswith("model/") for k in files))]
    opt_arrays = [files[f"optimizer/{i}"] for i in range(sum(k.startswith("optimizer/") for k in files))]
    try:
        model.set_weights(model_arrays)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if len(opt_arrays) != len(optimizer.variables):
            raise ValueError(f"{len(opt_arrays)} optimizer arrays for {len(optimizer.variables)} variables")
        for variable, value in zip(optimizer.variables, opt_arrays):
            variable.assign(value)
        for i, variable in enumerate(_random_state(model)):
            if f"random/{i}" in files:
                variable.assign(files[f"random/{i}"])
    except ValueError as e:
        raise UsageError(f"checkpoint {path} does not fit this model: {e}") from None
    return json.loads(files["state"].tobytes().decode())
