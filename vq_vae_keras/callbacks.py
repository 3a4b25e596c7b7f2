"""Small Keras callbacks for training: each does one job and works in any `model.fit`.

    fit(images, callbacks=[vqk.callbacks.NanGuard(), vqk.callbacks.ReconstructionGrids(vqvae, images[:32], "samples")])

They cost nothing between their periodic work: no per-step file opens, no per-step host reads of
model state; values Keras already hands to every callback (the logs) are buffered and written at
each flush. Steps are counted from the optimizer's iteration count at the start of fit (or `start`).
"""

import contextlib
import csv
import io
import itertools
import math
import os
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from . import backend
from .backend import sync_variables
from .codebook import histogram_image
from .grids import reconstruction_grid
from .errors import UsageError, warn
from .io import atomic_write_text, resumable, save_checkpoint, save_png, save_weights, write_failed
from .quantizers import CodeUsage, GumbelAnneal  # noqa: F401  (vqk.callbacks.GumbelAnneal)


class NonFiniteLoss(RuntimeError):
    pass


class StepCallback(keras.callbacks.Callback):
    """Keeps `self.step`, the global step just trained, without reading the model every step."""

    def __init__(self, start=None):
        super().__init__()
        self.start = start

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy()) if self.start is None else self.start

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.on_step(self.step, logs or {})

    def on_step(self, step, logs):
        pass


class Every(StepCallback):
    """fn(step, logs) after every step where (step - 1) % every == 0 (the reference samples after
    its first batch, then every 100), and once more at the end of training if not just called."""

    def __init__(self, every, fn, start=None, at_end=True):
        super().__init__(start)
        self.every, self.fn, self.at_end = every, fn, at_end
        self.last, self.logs = None, None

    def on_step(self, step, logs):
        self.logs = logs
        if (step - 1) % self.every == 0:
            sync_variables(self.model)
            self.fn(step, logs)
            self.last = step

    def on_train_end(self, logs=None):
        if self.at_end and self.logs is not None and self.last != self.step:
            self.fn(self.step, self.logs)
            self.last = self.step


class ReconstructionGrids(Every):
    """The reference's grids every `every` steps: folder/test_ae_1_<step-1>.png (encoder ->
    decoder) and test_ae_2_<step-1>.png (through the quantizer) of 32 fixed images
    (or images_fn(step) -> 32 images)."""

    def __init__(self, vqvae, images, folder, every=100, start=None):
        super().__init__(every, self.write, start)
        self.vqvae, self.folder = vqvae, folder
        self.images = images if callable(images) else (lambda step: images)
        self.written = {}

    def write(self, step, logs=None):
        images = self.images(step)
        name = step - 1  # the reference numbers grids by the index of the batch just trained
        for kind, quantize in (("test_ae_1", False), ("test_ae_2", True)):
            grid = reconstruction_grid(self.vqvae, images, 8, quantize=quantize)
            save_png(os.path.join(self.folder, f"{kind}_{name}.png"), grid)
            self.written[kind] = grid


def save_state(model, weights_path, checkpoint_path, step, state=None):
    """Weights file and resumable checkpoint, both atomic; refuses non-finite weights so the last
    good ones stay. state: more JSON-able values for the checkpoint, beside the step (what
    io.load_checkpoint returns). Returns whether it saved."""
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        warn(f"weights are not finite at step {step}; not saving them")
        return False
    with resumable(checkpoint_path):
        save_weights(model, weights_path)
        save_checkpoint(checkpoint_path, model, model.optimizer, {**(state or {}), "step": step})
    return True


class Checkpoint(Every):
    """The reference's periodic save, resumable: every `every` steps (after the first, then every
    `every`, and at the end) the model's weights file and a checkpoint of weights, optimizer state
    and step (`io.load_checkpoint` restores it), both atomic; non-finite weights are not saved."""

    def __init__(self, weights_path, checkpoint_path, every=100, start=None):
        super().__init__(every, lambda step, logs: save_state(self.model, weights_path, checkpoint_path, step),
                         start)


class NanGuard(StepCallback):

    """Stop at the first non-finite loss, before anything saves the broken weights."""

    def on_step(self, step, logs):
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"loss became {float(loss)} at step {step}; "
                                "the last checkpoint was kept (try a lower --lr)")


class LearningRate(keras.callbacks.Callback):
    """Logs the learning rate each step trained with as "lr": the optimizer's own (its schedule
    at the step it is about to take). Put it before the callbacks that read the logs."""

    def on_train_batch_begin(self, batch, logs=None):
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["lr"] = self.lr


class ResetMetrics(StepCallback):
    """Reset the running means before every `every`-th step (1: the logs are per-batch values),
    in one compiled call. Code usage is left alone: it is reset by the window that reports it."""

    def __init__(self, every, start=None):
        super().__init__(start)
        self.every, self.reset = every, None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.first = True

    def on_train_batch_begin(self, batch, logs=None):
        if self.first:  # fit has just reset them; compile()'s metrics are built by the first step
            self.first = False
            return
        if self.step % self.every == 0:
            if self.reset is None:
                metrics = [m for m in self.model.metrics if not isinstance(m, CodeUsage)]
                reset = lambda: [m.reset_state() for m in metrics]  # noqa: E731
                self.reset = tf.function(reset) if backend.name() == "tensorflow" else reset
            sync_variables(self.model)
            self.reset()


class TqdmProgress(StepCallback):
    def __init__(self, total, start, keys, desc):
        super().__init__(start)
        self.total, self.keys, self.desc = total, keys, desc

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step(self, step, logs):
        self.bar.set_postfix({k: f"{float(logs[k]):.4g}" for k in self.keys if k in logs}, refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.close()

    def close(self):
        """End the bar's line. Keras skips on_train_end when fit raises: call this then, so that
        an error message starts on a line of its own."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_text(fields, rows):
    """A CSV file's text: header and rows (dicts; keys outside fields ignored)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def log_rows_until(path, step):
    """The rows of a CSV log (a column "step") up to step, for a resumed run; [] if there is none.
    A damaged log (a row cut short by a crash or a full disk, a line of garbage) cannot say what
    it held: it is kept aside as PATH.damaged (PATH.damaged.2, ... if that exists: an earlier
    damaged log is never overwritten) with a warning, and the rows before the damage are kept.
    The log is a record only: training resumes from the checkpoint either way."""
    if not os.path.isfile(path):
        return []
    rows, reader = [], None
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:  # an empty file: nothing to keep
                return []
            if "step" not in reader.fieldnames:
                raise ValueError("no step column")
            for row in reader:
                if None in row or None in row.values():
                    raise ValueError("a row with the wrong number of fields")
                if int(row["step"]) <= step:
                    rows.append(row)
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        aside = path + ".damaged"
        for number in itertools.count(2):
            if not os.path.lexists(aside):
                break
            aside = f"{path}.damaged.{number}"
        try:
            os.replace(path, aside)
        except OSError as moving:
            raise write_failed(aside, moving) from None
        line = max(reader.line_num, 1) if reader else 1
        warn(f"{path} is damaged at line {line} ({e}); kept as {aside}, a new log starts with the "
             f"{len(rows)} rows before the damage")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}") from None
    return rows


class StepLog(StepCallback):
    """One row per step (step, epoch, keys...) kept in memory and written by flush(): to a CSV
    file (appended; on resume, rows past the resumed step are dropped first) and, given a
    TensorBoard writer, as scalars with the learning rate. Flushed at the end of training."""

    def __init__(self, path, keys, steps_per_epoch, start=None, resume=False, tensorboard=None):
        super().__init__(start)
        self.path, self.keys, self.steps_per_epoch = path, list(keys), steps_per_epoch
        self.fields = ["step", "epoch"] + self.keys
        self.tensorboard, self.rows = tensorboard, []
        kept = log_rows_until(path, start or 0) if resume else []
        atomic_write_text(path, csv_text(self.fields, kept))

    def _append(self, rows):
        """Rows at the end of the file; a failed write is cut off again, so no half row stays."""
        def text(value):
            return "" if value is None or (isinstance(value, float) and math.isnan(value)) else (
                f"{value:.6g}" if isinstance(value, float) else value)

        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore", lineterminator="\n")
                writer.writerows({k: text(v) for k, v in row.items()} for row in rows)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise write_failed(self.path, e) from None

    def on_step(self, step, logs):
        self.append(step, logs)

    def append(self, step, values):
        row = {"step": step, "epoch": (step - 1) // self.steps_per_epoch}
        row.update({k: float(values[k]) for k in self.keys if values.get(k) is not None})
        self.rows.append(row)

    def flush(self):
        if not self.rows:
            return
        self._append(self.rows)
        if self.tensorboard is not None:
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            for row in self.rows:  # a scheduled rate is in the row (LearningRate), a constant one is lr
                self.tensorboard.scalars(row["step"], {**{k: v for k, v in row.items() if k in self.keys and k != "lr"},
                                                       "learning_rate": row.get("lr", lr)})
            self.tensorboard.flush()
        self.rows = []

    def on_train_end(self, logs=None):
        self.flush()


def _metadata(plugin, data_class):
    """What TensorBoard's scalar/image/histogram plugins expect of a summary, written with
    TensorFlow's own tf.summary.write: the tensorboard package is needed to view, not to write."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(data_class=data_class)
    meta.plugin_data.plugin_name = plugin
    return meta


class TensorBoardWriter:
    """RUN/tensorboard/...: scalars, image grids and the code-usage histogram, by global step
    (view with `tensorboard --logdir RUN/tensorboard`)."""

    SCALAR, TENSOR, BLOBS = 1, 2, 3  # SummaryMetadata data classes

    def __init__(self, log_dir):
        self.writer = tf.summary.create_file_writer(log_dir)

    def scalars(self, step, values):
        meta = _metadata("scalars", self.SCALAR)
        with self.writer.as_default():
            for name, value in values.items():
                if value is not None and math.isfinite(float(value)):
                    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step, metadata=meta)

    def images(self, step, grids):
        """{tag: (H, W, 3) uint8 grid}, each as a PNG."""
        meta = _metadata("images", self.BLOBS)
        with self.writer.as_default():
            for name, grid in grids.items():
                grid = np.asarray(grid, np.uint8)
                png = tf.io.encode_png(grid)
                tensor = tf.stack([tf.as_string(grid.shape[1]), tf.as_string(grid.shape[0]), png])
                tf.summary.write(name, tensor, step=step, metadata=meta)

    def code_usage(self, step, counts, suffix=""):
        """Counts (num_codes,) as a histogram over code indices and as a bar-chart image
        (code_usage, code_usage_chart; the top level's with suffix "_top")."""
        counts = np.asarray(counts, np.float64)
        edges = np.arange(len(counts), dtype=np.float64)
        buckets = np.stack([edges, edges + 1, counts], axis=1)  # (left, right, count) per code
        with self.writer.as_default():
            tf.summary.write("code_usage" + suffix, buckets, step=step, metadata=_metadata("histograms", self.TENSOR))
        self.images(step, {"code_usage_chart" + suffix: histogram_image(counts)})

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class StopOnSignal(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop after the current step, so its log row and
    the final save still happen; a second Ctrl-C interrupts at once."""

    def __init__(self):
        super().__init__()
        self.requested = False

    def on_train_begin(self, logs=None):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT, signal.default_int_handler))

    def on_train_batch_end(self, batch, logs=None):
        if self.requested:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.restore_handlers()

    def restore_handlers(self):
        for sig, handler in getattr(self, "previous", {}).items():
            signal.signal(sig, handler)
        self.previous = {}


__all__ = ["Checkpoint", "Every", "GumbelAnneal", "LearningRate", "NanGuard", "NonFiniteLoss", "ReconstructionGrids",
           "ResetMetrics", "StepLog", "StopOnSignal", "TensorBoardWriter", "TqdmProgress"]
