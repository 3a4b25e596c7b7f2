"""Training loops for the VQ-VAE and the prior: model.fit plus small callbacks.

The global step is the optimizer's iteration count: it is saved with the weights and the Adam
moments, and it fixes the data position, so a resumed run continues exactly where it stopped.
"""

import csv
import math
import os
import signal
import threading

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .codebook import kmeans, summary
from .config import Config
from .data import ImageFolder, epoch_batches, warn
from .errors import UsageError
from .grids import reconstruction_grid
from .io import load_checkpoint, save_checkpoint, save_model, save_npy, save_png, save_weights
from .layers import CodeUsage
from .models import build_vqvae, compile_vqvae
from .run import RunDir, load_vqvae

REFERENCE_EPOCHS = 1000


class NonFiniteLoss(RuntimeError):
    pass


def global_step(model):
    return int(model.optimizer.iterations.numpy())


class ResetMetrics(keras.callbacks.Callback):
    """Reset the running means every `every` steps (1: the logs are per-batch values).
    Code usage is left alone: it is reset by the window that reports it."""

    def __init__(self, every):
        super().__init__()
        self.every = every

    def on_train_batch_begin(self, batch, logs=None):
        if global_step(self.model) % self.every == 0:
            for metric in self.model.metrics:
                if not isinstance(metric, CodeUsage):
                    metric.reset_state()


class NanGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss, before anything saves the broken weights."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"loss became {float(loss)} at step {global_step(self.model)}; "
                                "the last checkpoint was kept (try a lower --lr)")


class TqdmProgress(keras.callbacks.Callback):
    def __init__(self, total, initial, keys, desc):
        super().__init__()
        self.total, self.initial, self.keys, self.desc = total, initial, keys, desc

    def on_train_begin(self, logs=None):
        self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.bar.set_postfix({k: f"{float(logs[k]):.4g}" for k in self.keys if k in logs}, refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


class CSVLog:
    """Append-only CSV; on resume, rows past the checkpoint's step are dropped first."""

    def __init__(self, path, fields, resume_step=None):
        self.path, self.fields = path, ["step"] + list(fields)
        if resume_step is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._write(rows, "w")
        elif not os.path.isfile(path) or resume_step is None:
            self._write([], "w")

    def _write(self, rows, mode):
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def append(self, step, values):
        self._write([{"step": step, **{k: _fmt(v) for k, v in values.items()}}], "a")


def _fmt(value):
    return f"{float(value):.6g}" if isinstance(value, (float, np.floating, np.ndarray)) or hasattr(value, "numpy") else value


class Every(keras.callbacks.Callback):
    """Call fn(step, logs) after every step where (step - 1) % every == 0 (the reference samples
    after its first batch, then every 100), and fn(step, logs) once more at the end if it was not
    just called."""

    def __init__(self, every, fn, at_end=True):
        super().__init__()
        self.every, self.fn, self.at_end = every, fn, at_end
        self.last = None

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        self.logs = logs or {}
        if (step - 1) % self.every == 0:
            self.fn(step, self.logs)
            self.last = step

    def on_train_end(self, logs=None):
        step = global_step(self.model)
        if self.at_end and self.last != step and hasattr(self, "logs"):
            self.fn(step, self.logs)


class LogEachStep(keras.callbacks.Callback):
    def __init__(self, log, keys, steps_per_epoch):
        super().__init__()
        self.log, self.keys, self.steps_per_epoch = log, keys, steps_per_epoch

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        values = {k: (logs or {})[k] for k in self.keys if k in (logs or {})}
        self.log.append(step, {"epoch": (step - 1) // self.steps_per_epoch, **values})


def save_state(model, weights_path, checkpoint_path, step):
    """Weights file and resumable checkpoint, both atomic; refuses non-finite weights so the last
    good ones stay. Returns whether it saved."""
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        warn(f"weights are not finite at step {step}; not saving them")
        return False
    save_weights(model, weights_path)
    save_checkpoint(checkpoint_path, model, model.optimizer, {"step": step})
    return True


def resolve_total_steps(steps, epochs, steps_per_epoch):
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if steps is not None:
        return steps
    return (REFERENCE_EPOCHS if epochs is None else epochs) * steps_per_epoch


def seed_everything(seed):
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


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
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def fit_with_interrupt(model, dataset, start, total, callbacks, save):
    """model.fit from step `start` to `total`. A signal stops it cleanly (the callbacks save on
    train end) and then raises KeyboardInterrupt; a hard interrupt saves what there is."""
    stopper = StopOnSignal()
    try:
        if total > start:
            model.fit(dataset, epochs=1, steps_per_epoch=total - start, callbacks=[stopper, *callbacks],
                      verbose=0, shuffle=False)
    except KeyboardInterrupt:
        save(global_step(model))
        raise
    if stopper.requested:
        raise KeyboardInterrupt


# ---------------------------------------------------------------- VQ-VAE

VQVAE_KEYS = ["loss", "mse_x", "mse_e", "mse_z", "perplexity", "usage"]
GUMBEL_KEYS = ["loss", "mse_x", "kl", "temperature", "perplexity", "usage"]


def kmeans_initialise(vqvae, folder, config):
    """Codebook from k-means on the encoder outputs of the run's first batch (more batches of the
    first epoch if it holds fewer than 10 vectors per code). The encoder runs as in training
    (batch statistics), its BatchNorm moving averages are left as they were."""
    h, w = config.grid_shape
    indices = []
    for batch in epoch_batches(len(folder), config.batch_size, config.seed):
        indices.extend(batch)
        if len(indices) * h * w >= 10 * config.num_codes or len(indices) >= len(folder):
            break
    images = folder.read_batch(indices)
    saved = [v.numpy() for v in vqvae.encoder.non_trainable_variables]
    z = keras.ops.convert_to_numpy(vqvae.encoder(images, training=True))
    for variable, value in zip(vqvae.encoder.non_trainable_variables, saved):
        variable.assign(value)
    try:
        centroids = kmeans(z.reshape(-1, z.shape[-1]), config.num_codes, seed=config.seed)
    except ValueError as e:
        raise UsageError(f"--kmeans-init: {e} (use more images or fewer codes)") from None
    vqvae.vq_layer.initialise(centroids)


class GumbelAnneal(keras.callbacks.Callback):
    """Sets the Gumbel-softmax temperature from the global step before each step, and logs it."""

    def __init__(self, layer, config):
        super().__init__()
        self.layer, self.config = layer, config

    def on_train_batch_begin(self, batch, logs=None):
        self.layer.temperature.assign(self.config.gumbel_temperature_at(global_step(self.model)))

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["temperature"] = float(self.layer.temperature.numpy())


def train_vqvae(config: Config, run_dir, steps=None, epochs=None, resume=False, cache=None):
    """Train (or resume) the VQ-VAE of a run directory. Returns the VQVAE.
    cache: None (read files every step), "memory", or an .npz file path (see ImageFolder.cache)."""
    run = RunDir(run_dir)
    folder = ImageFolder(config.data, config.img_dim)
    if cache:
        folder.cache(None if cache == "memory" else cache)
    steps_per_epoch = folder.steps_per_epoch(config.batch_size)
    total = resolve_total_steps(steps, epochs, steps_per_epoch)

    seed_everything(config.seed)
    vqvae = build_vqvae(config)
    model = compile_vqvae(vqvae)
    model.optimizer.build(model.trainable_variables)
    start = 0
    if resume:
        start = load_checkpoint(run.vqvae_checkpoint, model, model.optimizer)["step"]
        print(f"resuming from step {start} of {total}")
    elif config.kmeans_init:
        kmeans_initialise(vqvae, folder, config)
    os.makedirs(run.samples, exist_ok=True)
    config.save(run.config)
    keys = GUMBEL_KEYS if config.quantizer == "gumbel" else VQVAE_KEYS
    log = CSVLog(run.log, ["epoch"] + keys, resume_step=start if resume else None)
    usage = next(m for m in model.metrics if isinstance(m, CodeUsage))
    window = {"since": start}  # code counts of the last --sample-every window, for the summary

    def save(step, logs=None):
        """The reference's Trainer: two grids and the weights, plus a resumable checkpoint."""
        if step == 0 or not save_state(model, run.vqvae_weights, run.vqvae_checkpoint, step):
            return
        rng = np.random.default_rng([config.seed, step])
        images = folder.random_images(32, rng)
        name = step - 1  # the reference numbers grids by the index of the batch just trained
        save_png(os.path.join(run.samples, f"test_ae_1_{name}.png"), reconstruction_grid(vqvae, images, 8, quantize=False))
        save_png(os.path.join(run.samples, f"test_ae_2_{name}.png"), reconstruction_grid(vqvae, images, 8, quantize=True))
        window.update(first=window["since"] + 1, last=step, counts=usage.counts.numpy().astype(np.int64), since=step)
        usage.reset_state()

    callbacks = [
        ResetMetrics(1),
        NanGuard(),
        *([GumbelAnneal(vqvae.vq_layer, config)] if config.quantizer == "gumbel" else []),
        LogEachStep(log, keys, steps_per_epoch),
        Every(config.sample_every, save),
        TqdmProgress(total, start, keys, "vqvae"),
    ]
    try:
        fit_with_interrupt(model, folder.dataset(config.batch_size, config.seed, start), start, total, callbacks, save)
    finally:
        if "counts" in window:
            tqdm.write(f"codebook, steps {window['first']}-{window['last']}: {summary(window['counts'])}")
    save_model(model, run.vqvae_keras)
    return vqvae


# ---------------------------------------------------------------- prior

PRIOR_KEYS = ["loss", "accuracy"]


def prior_codes(config: Config, run: RunDir, resume):
    """RUN/codes.npy: reused on --resume, else every training image encoded and saved."""
    from .prior import check_codes, encode_folder

    if resume and os.path.isfile(run.codes):
        try:
            codes = np.load(run.codes)
        except Exception as e:
            raise UsageError(f"cannot read {run.codes}: {e}") from None
        return check_codes(codes, config, run.codes)
    if not config.data:
        raise UsageError("no image folder: give --data (the run's config.json names none)")
    codes = encode_folder(load_vqvae(config, run), ImageFolder(config.data, config.img_dim), config.batch_size)
    save_npy(run.codes, codes)
    return codes


def split_validation(tokens, fraction, seed):
    """Seeded hold-out: (train, validation); at least one of each when there are two or more."""
    order = np.random.default_rng([seed, 1]).permutation(len(tokens))
    n_val = int(round(fraction * len(tokens)))
    if fraction > 0 and len(tokens) >= 2:
        n_val = min(max(n_val, 1), len(tokens) - 1)
    return tokens[order[n_val:]], tokens[order[:n_val]]


def train_prior(config: Config, run_dir, steps=None, epochs=None, resume=False):
    """Train (or resume) the prior of a run directory on its VQ-VAE's codes. Returns the prior."""
    from .grids import codes_grid
    from .prior import build_prior, codes_to_tokens, prior_nll
    from .sampling import sample_codes

    run = RunDir(run_dir)
    seed = config.seed if config.prior_seed is None else config.prior_seed
    codes = prior_codes(config, run, resume)
    train_tokens, val_tokens = split_validation(codes_to_tokens(codes), config.val_split, seed)
    batch_size = config.prior_batch_size
    steps_per_epoch = math.ceil(len(train_tokens) / batch_size)
    total = resolve_total_steps(steps, epochs, steps_per_epoch)

    seed_everything(seed)
    prior = build_prior(config)
    prior.compile(optimizer=keras.optimizers.Adam(config.prior_lr), loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    prior.optimizer.build(prior.trainable_variables)
    start = 0
    if resume:
        start = load_checkpoint(run.prior_checkpoint, prior, prior.optimizer)["step"]
        print(f"resuming the prior from step {start} of {total}")
    config.save(run.config)
    log = CSVLog(run.prior_log, ["epoch", "loss", "accuracy", "val_nll"], resume_step=start if resume else None)
    vqvae = None

    def save(step, logs=None):
        if step > 0:
            save_state(prior, run.prior_weights, run.prior_checkpoint, step)

    def end_of_epoch(step, logs):
        """Validation NLL, a log row and a grid of random samples at the end of each epoch."""
        nonlocal vqvae
        epoch = (step - 1) // steps_per_epoch
        val_nll = prior_nll(prior, val_tokens, batch_size) if len(val_tokens) else float("nan")
        log.append(step, {"epoch": epoch, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"), "val_nll": val_nll})
        tqdm.write(f"prior epoch {epoch}: loss {float(logs.get('loss', np.nan)):.4f}, "
                   f"accuracy {float(logs.get('accuracy', np.nan)):.4f}, val_nll {val_nll:.4f}")
        if vqvae is None:
            vqvae = load_vqvae(config, run)
        sampled = sample_codes(prior, 64, config.grid_shape, seed=seed + epoch)
        save_png(os.path.join(run.samples, f"prior_sample_{epoch}.png"), codes_grid(vqvae, sampled))

    class EpochEnd(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = global_step(self.model)
            if step % steps_per_epoch == 0 or step == total:
                end_of_epoch(step, logs or {})

    def batches():
        for indices in epoch_batches(len(train_tokens), batch_size, seed, start):
            batch = train_tokens[indices]
            yield batch[:, :-1], batch[:, 1:] - 1

    length = train_tokens.shape[1] - 1
    spec = tf.TensorSpec((None, length), tf.int32)
    dataset = tf.data.Dataset.from_generator(batches, output_signature=(spec, spec)).prefetch(tf.data.AUTOTUNE)
    callbacks = [
        ResetMetrics(steps_per_epoch),
        NanGuard(),
        Every(config.sample_every, save),
        EpochEnd(),
        TqdmProgress(total, start, PRIOR_KEYS, "prior"),
    ]
    fit_with_interrupt(prior, dataset, start, total, callbacks, save)
    return prior
