"""Files on disk: atomic writes, image grids, weight files and resumable checkpoints.

Every file is written to a temporary name in the same folder and renamed into place, so a
kill at any moment leaves the previous version intact. A write that fails (a full disk, no
permission, a file where a folder should be) raises WriteFailed, naming the file and why.
"""

import contextlib
import io
import json
import os
import secrets
import warnings

import numpy as np

from .errors import UsageError, WriteFailed


def _blocking_file(folder):
    """The nearest existing ancestor of folder that is not a folder, or None."""
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        folder = None if parent == folder else parent
    return folder if folder and not os.path.isdir(folder) else None


def write_failed(path, error):
    """WriteFailed for an OSError met while writing path: one sentence, which file and why."""
    blocking = _blocking_file(os.path.dirname(os.path.abspath(path)))
    if blocking:
        reason = f"{blocking} is a file, not a folder"
    else:
        # the C library's words for errno ("No space left on device"): h5py's strerror runs to lines
        reason = os.strerror(error.errno) if error.errno else (str(error).strip() or type(error).__name__)
        reason = reason.splitlines()[0]
        reason = reason[:1].lower() + reason[1:]
    return WriteFailed(f"cannot write {path}: {reason}")


def _new_file(folder, suffix):
    """An empty file of a fresh name in folder, created with mode 0666 less the umask, as open()
    would create the file itself (mkstemp's private 0600 would stay on it after the rename)."""
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _remove(path):
    if path is not None:
        with contextlib.suppress(OSError):
            os.remove(path)


def _atomic(path, write, suffix=""):
    """Call write(tmp_path), then rename tmp_path over path. suffix keeps an ending some writers need.
    An OSError on the way is a WriteFailed, and path keeps its previous version."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = _new_file(folder, suffix)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    except OSError as e:
        failed = write_failed(path, e)
    except BaseException:
        _remove(tmp)
        raise
    _remove(tmp)
    # Raised outside the except block: the OSError's traceback (the writer's frames, which may
    # hold open files) is not kept alive as this exception's context.
    raise failed


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

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


def weights_file_bytes(model):
    """The bytes model.save_weights writes, made in memory by Keras's own writer, or None where
    this Keras does not have it. HDF5 must not write to disk itself: after a write it could not
    finish (a full disk) it keeps a half-closed dataset that crashes the process at exit."""
    try:
        from keras.src.saving import saving_lib

        buffer = io.BytesIO()
        store = saving_lib.H5IOStore(buffer, mode="w")
        write_state = saving_lib._save_state  # private: a Keras that renames it takes the public path
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    write_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    store.close()
    return buffer.getvalue()


def save_weights(model, path):
    """model.save_weights, atomically (Keras wants the name to end in .weights.h5)."""
    data = weights_file_bytes(model)
    if data is None:
        _atomic(path, model.save_weights, suffix=".weights.h5")
    else:
        write_bytes(path, data)


def save_model(model, path):
    """A functional model's layers and weights to a .keras file, atomically, without its optimizer
    (the checkpoint keeps that): so that the file loads under every Keras backend, where Keras
    would name PyTorch's Adam by a module that only the PyTorch backend has."""
    uncompiled = type(model)(model.inputs, model.outputs, name=model.name)  # the same layers
    _atomic(path, uncompiled.save, suffix=".keras")


class _Chunks:
    """A file NumPy writes to through write(), in chunks: its fast path for real files (tofile)
    reports a full disk as "N requested and M written", with no errno to say why."""

    def __init__(self, file):
        self.write = file.write


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(_Chunks(f), array)

    _atomic(path, write)


def save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic(path, write)


@contextlib.contextmanager
def resumable(checkpoint):
    """A WriteFailed inside says whether training can resume from checkpoint, and how."""
    try:
        yield
    except WriteFailed as e:
        if getattr(e, "advised", False):  # said already, by an inner resumable
            raise
        if os.path.isfile(checkpoint):
            advice = f"the last checkpoint ({checkpoint}) is intact: make room and add --resume to continue"
        else:
            advice = "no checkpoint was written yet, so the run cannot resume: make room and train it anew"
        failed = WriteFailed(f"{e}; {advice}")
        failed.advised = True
    else:
        return
    raise failed


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


# Checkpoint: one .npz file with every variable of the model (weights, BatchNorm statistics, EMA
# state, seed-generator states), every optimizer variable and a JSON state, each keyed by name, so
# a variable can only be restored into the variable it came from. Keras paths are not unique in a
# model of sub-models (the encoder and the decoder both have a "bn1"), so a sub-model's name is put
# in front; optimizer slots are named after the model variable they belong to.

CHECKPOINT_FORMAT = 2  # 1: this project's first checkpoints, matched by position (refused)


def model_variables(model):
    """{name: variable} of every variable of a model, names like "encoder/bn1/gamma"."""
    import keras

    named, seen = {}, set()

    def walk(layers, prefix):
        for layer in layers:
            if isinstance(layer, keras.Model):
                walk(layer.layers, f"{prefix}{layer.name}/")
                continue
            for variable in layer.variables:
                if id(variable) not in seen:  # a layer shared by two sub-models is saved once
                    seen.add(id(variable))
                    name = prefix + variable.path
                    if name in named:
                        raise RuntimeError(f"two variables named {name}: the checkpoint cannot tell them apart")
                    named[name] = variable

    walk(model.layers, "")
    if seen != {id(v) for v in model.variables}:
        raise RuntimeError("a model variable has no name in the checkpoint")
    return named


def optimizer_variables(optimizer, model):
    """{name: variable} of an optimizer's variables: "iteration", "learning_rate", and each slot as
    "<model variable name>/<slot>" ("encoder/bn1/gamma/momentum"). Keras names a slot after its
    variable's path with "/" -> "_", which two sub-models can share: the k-th slot of that name
    belongs to the k-th such variable of model.trainable_variables, the order the optimizer was
    built in."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # float16 loss scaling wraps Adam: its own variables ("dynamic_scale", ...), then Adam's
        inner_ids = {id(v) for v in inner.variables}
        named = {f"loss_scale/{v.name}": v for v in optimizer.variables if id(v) not in inner_ids}
        return {**named, **optimizer_variables(inner, model)}
    name_of = {id(v): name for name, v in model_variables(model).items()}
    by_mangled = {}
    for variable in model.trainable_variables:
        by_mangled.setdefault(variable.path.replace("/", "_"), []).append(name_of[id(variable)])
    named, taken = {}, {}
    for variable in optimizer.variables:
        key = variable.name
        for mangled in sorted(by_mangled, key=len, reverse=True):  # the longest prefix: "a_b" before "a"
            if key.startswith(mangled + "_"):
                slot = key[len(mangled) + 1:]
                k = taken.get((mangled, slot), 0)
                taken[(mangled, slot)] = k + 1
                if k < len(by_mangled[mangled]):
                    key = f"{by_mangled[mangled][k]}/{slot}"
                break
        if key in named:
            raise RuntimeError(f"two optimizer variables named {key}: the checkpoint cannot tell them apart")
        named[key] = variable
    return named


def _checkpoint_variables(model, optimizer):
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    named = {f"model/{k}": v for k, v in model_variables(model).items()}
    named.update({f"optimizer/{k}": v for k, v in optimizer_variables(optimizer, model).items()})
    return named


def save_checkpoint(path, model, optimizer, state):
    arrays = {k: np.asarray(v) for k, v in _checkpoint_variables(model, optimizer).items()}
    arrays["format"] = np.array(CHECKPOINT_FORMAT)
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    save_npz(path, **arrays)


def _listing(names, most=3):
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def checkpoint_state(path):
    """The JSON state of a checkpoint (what load_checkpoint returns), read without its variables."""
    try:
        with np.load(path) as archive:
            return json.loads(archive["state"].tobytes().decode())
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path, error):
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UsageError(f"cannot read checkpoint {path}: {reason}")


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer variables in place, by name; return the saved state dict.
    Any missing, extra or reshaped variable is a UsageError, and then nothing is changed."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with np.load(path) as archive:
            files = dict(archive)
        state = json.loads(files.pop("state").tobytes().decode())
        saved_format = int(files.pop("format", 1))
    except Exception as e:  # zip, pickle, JSON and key errors: all mean "not our checkpoint"
        raise _unreadable(path, e) from None
    if saved_format != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {path} is in an older format (variables by position) that cannot be "
                         "restored safely; train again without --resume")
    named = _checkpoint_variables(model, optimizer)
    problems = []
    if set(named) - set(files):
        problems.append(f"missing {_listing(set(named) - set(files))}")
    if set(files) - set(named):
        problems.append(f"unexpected {_listing(set(files) - set(named))}")
    reshaped = [k for k in set(named) & set(files) if tuple(files[k].shape) != tuple(named[k].shape)]
    if reshaped:
        problems.append(f"other shapes for {_listing(reshaped)}")
    if problems:
        raise UsageError(f"checkpoint {path} does not fit this model ({'; '.join(problems)})")
    for name, variable in named.items():
        variable.assign(files[name])
    return state
