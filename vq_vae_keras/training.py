"""Training the VQ-VAE and the prior: model.fit on a tf.data pipeline, plus small callbacks
(callbacks.py). Each function reads top to bottom: data, model, resume, callbacks, fit.

The global step fixes the data position (the seeded per-epoch shuffle), so a resumed run
continues exactly where it stopped: weights, Adam moments, random generator states and the step
are saved together at every sample step.

strategy= (a tf.distribute strategy, distribute.py) builds the models, optimizer and metrics in its
scope and splits each global batch of config.batch_size over the replicas. Every worker runs the
same loop (the grids and logs read distributed state, which takes all workers); only the chief
writes the run directory, the other workers write into a temporary folder that goes at the end.
"""

import contextlib
import math
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .backend import sync_variables
from .callbacks import (Every, LearningRate, NanGuard, StepCallback, NonFiniteLoss, ReconstructionGrids,  # noqa: F401
                        ResetMetrics, StepLog, StopOnSignal, TensorBoardWriter, TqdmProgress, save_state)
from .codebook import TRAINING_COUNTED, kmeans, summary
from .config import OPTIMIZER_FIELDS, Config
from .data import ImageArray, ImageFolder, epoch_batches, index_dataset, load_images
from .distribute import check_global_batch, distributed, is_chief, strategy_scope, vector_logs, xla_off_under
from .errors import UsageError, warn
from .io import checkpoint_state, load_checkpoint, resumable, save_model, save_npy, save_png
from .models import build_vqvae, compile_vqvae, learning_rate, level_names, log_names
from .quantizers import LEVEL_SUFFIXES
from .run import RunDir, load_prior, load_vqvae

REFERENCE_EPOCHS = 1000
PRIOR_KEYS = ["loss", "accuracy"]
EVAL_EVERY = 1000  # steps between held-out evaluations (--eval-every)
AUTO_CACHE_BYTES = 256 * 2 ** 20  # cache="auto": decoded folders up to this size are kept in memory


def seed_everything(seed, jit_compile=False):
    """Process-wide: Python, NumPy and TensorFlow seeded; without XLA, TensorFlow's ops made
    deterministic too. Only when asked (train.py asks; train_*(deterministic=True)).
    XLA-compiled steps are reproducible on their own, and Keras turns XLA off for good in a process
    where op determinism is on, so it is left off for them."""
    keras.utils.set_random_seed(seed)
    if not jit_compile:
        tf.config.experimental.enable_op_determinism()


def resolve_total_steps(steps, epochs, steps_per_epoch):
    if steps is not None and epochs is not None:
        raise UsageError("give steps or epochs, not both")
    if steps is not None:
        return steps
    if steps_per_epoch is None:
        raise UsageError("give steps=: the dataset's length is unknown, so epochs cannot be counted")
    return (REFERENCE_EPOCHS if epochs is None else epochs) * steps_per_epoch


def already_done(start, total, what):
    """A resumed run at or past its last step: say so and train nothing."""
    if start < total:
        return False
    print(f"the {what} is already at step {start}" + (f", past the {total} asked for" if start > total else "")
          + ": nothing to train (ask for more steps to go on)")
    return True


def writable_run(run, strategy):
    """The chief writes the run directory; another worker a temporary folder of its own."""
    return run if is_chief(strategy) else RunDir(tempfile.mkdtemp(prefix="vqk-worker-"))


def fit_with_interrupt(model, dataset, start, total, callbacks, save):
    """model.fit from step `start` to `total`. A signal stops it cleanly (the callbacks save on
    train end) and then raises KeyboardInterrupt; a hard interrupt saves what there is."""
    stopper = StopOnSignal()
    try:
        if total > start:
            model.fit(dataset, epochs=1, steps_per_epoch=total - start, callbacks=[stopper, *callbacks], verbose=0,
                      shuffle=False)
    except KeyboardInterrupt:
        sync_variables(model)
        save(int(model.optimizer.iterations.numpy()))
        raise
    finally:  # Keras skips on_train_end when fit raises: give the signals back, end the bar's line
        stopper.restore_handlers()
        for callback in callbacks:
            if isinstance(callback, TqdmProgress):
                callback.close()
    if stopper.requested:
        raise KeyboardInterrupt


def open_run(run_dir, config, strategy, prior, resume, overwrite, taken, what):
    """A stage's run directory (prior: the prior's stage), checked before anything is read or
    written: XLA off under a strategy (the one rule), a run where taken(run) refused unless resume
    or overwrite, and a resume that asks for another learning rate than the run's (keep_schedule)."""
    xla_off_under(strategy, config, Config.stage_field("jit_compile", prior))
    field = Config.stage_field("batch_size", prior)
    check_global_batch(getattr(config, field), field)
    run = RunDir(run_dir)
    if resume and os.path.isfile(run.config):
        keep_schedule(config, Config.load(run.config), prior)
    if is_chief(strategy) and not resume and not overwrite and taken(run):
        raise UsageError(f"{run_dir} already {what}; resume=True continues it, overwrite=True replaces it")
    return run


def keep_schedule(config, saved, prior=False):
    """A resumed stage goes on at its checkpoint's learning rate (the rate, or the schedule's step
    and shape, in the optimizer's state): a Config from Python that asks for another is an error
    naming the field (the command line refuses such flags itself), not a silent change or a
    checkpoint that does not fit. prior: the prior's fields."""
    for name in OPTIMIZER_FIELDS:
        field = Config.stage_field(name, prior)
        if getattr(config, field) != getattr(saved, field):
            raise UsageError(f"{field} {getattr(config, field)!r} differs from the run's {getattr(saved, field)!r}: "
                             "a resumed run keeps its learning rate (start a new run to change it)", field)


def build_and_resume(build, strategy, checkpoint, resume, total, what, total_given=True, decays=False):
    """(model, checkpoint state): build(lr_steps) -> a compiled model whose learning-rate schedule
    ends at step lr_steps, made in the strategy's scope with its optimizer's variables, restored
    from the checkpoint on resume (every worker reads the chief's). state["total"] is the last
    step: `total`, or on a resume without steps or epochs (total_given False) the one the run was
    started with. state["lr_steps"] is the total the run started with: a resume keeps its schedule
    (decays: one that depends on it, said in a warning where the resume goes elsewhere). state is
    None when a resumed run is already there: nothing to train."""
    lr_steps = total
    if resume:
        if not os.path.isfile(checkpoint):
            raise UsageError(f"nothing to resume: no checkpoint at {checkpoint} (the run stopped before its first "
                             "save): train it anew, without resume")
        lr_steps = checkpoint_state(checkpoint).get("lr_steps", total)  # earlier releases: a constant lr
    with strategy_scope(strategy):
        model = build(lr_steps)
        model.optimizer.build(model.trainable_variables)
    vector_logs(model, strategy)
    if not resume:
        return model, {"step": 0, "total": total, "lr_steps": total}
    state = load_checkpoint(checkpoint, model, model.optimizer)
    state["lr_steps"] = lr_steps
    if total_given or "total" not in state:  # checkpoints of earlier releases do not say
        state["total"] = total
    if already_done(state["step"], state["total"], what):
        return model, None
    print(f"resuming the {what} from step {state['step']} of {state['total']}")
    if decays and state["total"] != lr_steps:
        warn(f"the {what}'s learning rate keeps the run's cosine schedule, which ends at step {lr_steps}, "
             f"not {state['total']}")
    return model, state


def fit_stage(model, dataset, start, total, run_callbacks, user_callbacks, save, checkpoint, strategy, keys, desc,
              reset_every):
    """fit from global step start to total, with what every stage runs around its own callbacks:
    running means reset every reset_every steps, the NaN guard, a progress bar, the user's
    callbacks last. A write that fails says whether the checkpoint lets --resume go on."""
    callbacks = [ResetMetrics(reset_every, start), NanGuard(start), *run_callbacks,
                 TqdmProgress(total, start, keys, desc), *user_callbacks]
    with resumable(checkpoint):
        fit_with_interrupt(model, distributed(dataset, strategy), start, total, callbacks, save)


@contextlib.contextmanager
def stage_files(writes, strategy, board):
    """However training ends: TensorBoard's writer closed, and another worker's temporary run
    folder removed (only the chief writes the run directory)."""
    try:
        yield
    finally:
        if board is not None:
            board.close()
        if not is_chief(strategy):
            shutil.rmtree(writes.root, ignore_errors=True)


# ---------------------------------------------------------------- VQ-VAE

def training_images(data, config: Config, cache=None):
    """data -> (source, dataset(start_step)): source serves random images for the grids (and
    k-means), dataset the training batches from a global step on.
    data: a folder (the reference's epochs), an array (N, d, d, 3) in [-1, 1] (the same epochs),
    or a tf.data.Dataset of image batches, repeated; resuming skips the batches already trained,
    so it continues exactly only if the dataset gives the same batches each time."""
    if isinstance(data, tf.data.Dataset):
        if isinstance(data.element_spec, tuple):
            raise UsageError("data: a dataset of image batches only (no labels: the model is its own target)")
        pool = np.concatenate([np.asarray(b) for b in data.take(max(1, 256 // config.batch_size))])
        source = ImageArray(pool)
        steps_per_epoch = int(data.cardinality()) if int(data.cardinality()) > 0 else None
        return source, (lambda start: data.repeat().skip(start).prefetch(tf.data.AUTOTUNE)), steps_per_epoch
    if isinstance(data, (str, os.PathLike)):
        source = ImageFolder(data, config.img_dim)
        if cache == "auto":  # small folders: decoding every step would cost more than these short steps
            if len(source) * config.img_dim ** 2 * 3 <= AUTO_CACHE_BYTES:
                source.cache(progress=False)  # a second or two: no bar
        elif cache:
            source.cache(None if cache == "memory" else cache)
    elif data is None:
        raise UsageError("no training data: give data= (a folder, an image array or a tf.data.Dataset) or config.data")
    else:
        source = ImageArray(data)
    if source.img_dim != config.img_dim:
        raise UsageError(f"images are {source.img_dim} px, the config says img_dim {config.img_dim}")
    dataset = lambda start: source.dataset(config.batch_size, config.seed, start)  # noqa: E731
    return source, dataset, source.steps_per_epoch(config.batch_size)


def kmeans_initialise(vqvae, folder, config):
    """Codebook from k-means on the encoder outputs of the run's first batch (more batches of the
    first epoch if it holds fewer than 10 vectors per code, at each level). The encoder runs as in
    training (batch statistics), its BatchNorm moving averages are left as they were. Two levels:
    the top codebook first, then the bottom one on the latents its code vectors give."""
    grids = [config.grid_shape, config.top_grid_shape]  # bottom, top: as vq_layers
    per_image = [(h * w, layer.num_codes) for (h, w), layer in zip(grids, vqvae.vq_layers)]
    indices = []
    for batch in epoch_batches(len(folder), config.batch_size, config.seed):
        indices.extend(batch)
        enough = all(len(indices) * positions >= 10 * num_codes for positions, num_codes in per_image)
        if enough or len(indices) >= len(folder):
            break
    images = folder.read_batch(indices)
    for level, layer in reversed(list(enumerate(vqvae.vq_layers))):
        saved = [v.numpy() for v in vqvae.encoder.non_trainable_variables]
        z = keras.ops.convert_to_numpy(keras.tree.flatten(vqvae.encoder(images, training=True))[level])
        for variable, value in zip(vqvae.encoder.non_trainable_variables, saved):
            variable.assign(value)
        try:
            centroids = kmeans(z.reshape(-1, z.shape[-1]), layer.num_codes, seed=config.seed)
        except ValueError as e:
            raise UsageError(f"--kmeans-init: {e} (use more images or fewer codes)") from None
        layer.initialise(centroids)


def train_vqvae(config: Config, run_dir, steps=None, epochs=None, resume=False, cache=None, data=None,
                callbacks=(), deterministic=False, tensorboard=False, eval_data=None, eval_every=EVAL_EVERY,
                overwrite=False, strategy=None):
    """Train (or resume) the VQ-VAE of a run directory. Returns the VQVAE.

    data: None (config.data), a folder, an array of images in [-1, 1] or a tf.data.Dataset of
      image batches. cache (folders): None (read files every step), "memory", an .npz path, or
      "auto" (train.py's default: "memory" when the decoded images take at most 256 MiB, else None);
      every choice gives the same batches.
    callbacks: Keras callbacks appended to the run's own (grids, checkpoints, log, progress).
    deterministic: also seed Python/NumPy/TensorFlow from config.seed and turn on TensorFlow's op
      determinism, process-wide (train.py does), so that a run repeats exactly. Without it the
      initial weights and the data order still follow config.seed, but two runs need not agree
      bit for bit.
    tensorboard: write RUN/tensorboard/ (scalars every step, grids and code usage at sample steps).
    eval_data: held-out images (a folder or an array) scored every eval_every steps and at the end:
      psnr, ssim and codes_used rows in RUN/eval_log.csv (and TensorBoard scalars).
    overwrite: without resume, a run_dir that already holds a run is an error unless this is True.
    strategy: a tf.distribute strategy (distribute.make_strategy), None for one device; the step
      then runs without XLA (config.jit_compile is set False). config.batch_size stays the global batch.
    config.data records the folder trained on (None after arrays or a dataset: train_prior then
    needs its images as data=).
    """
    from .evaluation import EvaluateEvery

    run = open_run(run_dir, config, strategy, False, resume, overwrite,
                   RunDir.holds_vqvae, "holds a run")
    if data is None:
        data = config.data
    if isinstance(data, (str, os.PathLike)):
        data = config.data = str(data)
    else:  # an array or a dataset: no folder to record, and config.data must not name another one
        config.data = None
    source, dataset, steps_per_epoch = training_images(data, config, cache)
    total = resolve_total_steps(steps, epochs, steps_per_epoch)
    if isinstance(eval_data, (str, os.PathLike)):  # read before anything is written: a bad folder changes nothing
        eval_data = load_images(eval_data, config.img_dim)
    if deterministic:
        seed_everything(config.seed, config.jit_compile)

    vqvae = None

    def build(lr_steps):
        nonlocal vqvae
        vqvae = build_vqvae(config)
        return compile_vqvae(vqvae, lr_steps)

    model, state = build_and_resume(build, strategy, run.vqvae_checkpoint, resume, total, "VQ-VAE",
                                    total_given=steps is not None or epochs is not None,
                                    decays=config.lr_schedule == "cosine")
    if state is None:
        return vqvae
    total = state["total"]
    if not resume and config.kmeans_init:
        kmeans_initialise(vqvae, source, config)
    start, writes = state["step"], writable_run(run, strategy)
    os.makedirs(writes.samples, exist_ok=True)
    config.save(writes.config)

    keys = log_names(config)
    board = TensorBoardWriter(writes.path("tensorboard", "vqvae")) if tensorboard else None
    log = StepLog(writes.log, keys, steps_per_epoch, start, resume, board)
    images = lambda step: source.random_images(32, np.random.default_rng([config.seed, step]))  # noqa: E731
    if strategy is not None:  # the counts live on every replica: a resumed window starts afresh there
        state = {**state, "usage_since": start, **dict.fromkeys(SampleSteps.COUNTS_KEYS)}
    samples = SampleSteps(vqvae, writes, images, log, board, start, state, total)
    run_callbacks = [
        *[c for layer in vqvae.vq_layers for c in layer.training_callbacks(config, start)],  # before the log: they may add to its row
        *([LearningRate()] if config.lr_scheduled() else []),
        log,
        samples,
    ]
    if eval_data is not None:
        run_callbacks.append(EvaluateEvery(vqvae, eval_data, eval_every, writes.eval_log, initial_step=start,
                                           tensorboard_dir=writes.path("tensorboard", "vqvae") if tensorboard else None))
    with stage_files(writes, strategy, board):
        try:
            fit_stage(model, dataset(start), start, total, run_callbacks, callbacks, samples.save,
                      writes.vqvae_checkpoint, strategy, keys, "vqvae", reset_every=1)
            with resumable(writes.vqvae_checkpoint):
                save_model(model, writes.vqvae_keras)
        finally:
            log.flush()
            samples.print_summary()
    return vqvae


class SampleSteps(Every):
    """The reference's Trainer, resumable: at each sample step (1, 1 + sample_every, ...), at the
    end and on Ctrl-C, the buffered log rows, the weights and a checkpoint, then the two grids
    (callbacks.ReconstructionGrids) and TensorBoard's images.

    It also keeps the code counts since the last sample step (the log's usage columns, and the
    closing summary), each level's. A save between sample steps keeps them in the checkpoint, so a
    resumed run goes on counting from the sample step, not from where it stopped."""

    COUNTS_KEYS = tuple(level_names(["usage_counts"], 2))  # the checkpoint's, bottom then top

    def __init__(self, vqvae, run, images, log, board, start, state, total):
        super().__init__(vqvae.config.sample_every, self.save, start)
        # saved with each checkpoint: a resume without steps goes on to total, and keeps the schedule
        self.total, self.lr_steps = total, state["lr_steps"]
        self.vqvae, self.run, self.log, self.board = vqvae, run, log, board
        self.grids = ReconstructionGrids(vqvae, images, run.samples)
        self.usages = [layer.usage for layer in vqvae.vq_layers]
        self.since, self.window = state.get("usage_since", start), None
        self.saved_counts = [state.get(key) for key in self.COUNTS_KEYS[:len(self.usages)]]

    def on_epoch_begin(self, epoch, logs=None):
        # fit resets every metric as its epoch begins: the counts saved by a stopped run go back just after
        for usage, counts in zip(self.usages, self.saved_counts):
            if counts is not None:
                usage.counts.assign(np.asarray(counts).astype(usage.counts.dtype))
        self.saved_counts = [None] * len(self.usages)

    def save(self, step, logs=None):
        self.log.flush()
        counts = [usage.counts.numpy().astype(np.int64) for usage in self.usages]
        window_ends = (step - 1) % self.every == 0
        usage = {"usage_since": step} if window_ends else \
            {"usage_since": self.since, **{key: c.tolist() for key, c in zip(self.COUNTS_KEYS, counts)}}
        model, run = self.vqvae.train_model, self.run
        if step == 0 or not save_state(model, run.vqvae_weights, run.vqvae_checkpoint, step,
                                       {"total": self.total, "lr_steps": self.lr_steps, **usage}):
            return
        self.grids.write(step)
        self.window, self.since = (self.since + 1, step, counts), step
        for usage in self.usages:
            usage.reset_state()
        if self.board is not None:
            self.board.images(step, self.grids.written)
            for suffix, level_counts in zip(LEVEL_SUFFIXES, counts):
                self.board.code_usage(step, level_counts, suffix)
            self.board.flush()

    def print_summary(self):
        if self.window is not None:
            first, last, counts = self.window
            for name, level_counts in zip(("codebook", "top codebook"), counts):
                tqdm.write(f"{name}, steps {first}-{last}: {summary(level_counts, counted=TRAINING_COUNTED)}")


# ---------------------------------------------------------------- prior

def prior_codes(config: Config, run: RunDir, resume, classes=False, write_to=None, data=None):
    """(codes (N, h, w), labels (N,) or None): RUN/codes.npy, and for a class-conditional prior
    (classes, or config.classes already set) RUN/labels.npy, each image's class. Reused on
    resume, else every image of `data` (an array, a folder, or None: config.prior_data, else
    config.data) is encoded, its class read from its subfolder (config.classes gets the names)
    and both saved (into write_to if given: a worker other than the chief)."""
    from .priors.tokens import check_codes

    conditional = (classes or config.classes is not None) and run.level != "bottom"
    if (resume or run.level == "bottom") and os.path.isfile(run.codes):  # the bottom's: the top stage wrote them
        codes = check_codes(_load_npy(run.codes), config, run.codes, run.level)
        return codes, (check_labels(_load_npy(run.labels), config, len(codes), run.labels) if conditional else None)
    if data is None:
        data = config.prior_data or config.data
    if data is None:
        raise UsageError("no images to encode for the prior: the VQ-VAE was not trained on a folder, so pass "
                         "the images as data= (an array or a folder; train.py prior: --data DIR)", field="prior_data")
    if isinstance(data, (str, os.PathLike)):
        folder = ImageFolder(str(data), config.img_dim)
        if str(data) != config.data:  # the VQ-VAE's folder stays recorded in config.data
            config.prior_data = str(data)
    elif conditional:
        raise UsageError("classes: a class-conditional prior reads each image's class from its subfolder; "
                         "pass a folder as data=", field="classes")
    else:
        folder = ImageArray(data)
    if folder.img_dim != config.img_dim:
        raise UsageError(f"images are {folder.img_dim} px, the config says img_dim {config.img_dim}")
    if conditional:
        config.classes, labels = folder.class_labels()
    codes = load_vqvae(config, run).encode_folder(folder, config.batch_size)
    if conditional:
        labels = labels[folder.usable()]  # the unreadable images are not in codes either
        save_npy((write_to or run).labels, labels)
    if config.levels == 2:  # both levels' maps: the bottom prior learns under the top ones
        for level, level_codes in zip(("bottom", "top"), codes):
            save_npy((write_to or run).at_level(level).codes, level_codes)
        return codes[run.level == "top"], labels if conditional else None
    save_npy((write_to or run).codes, codes)
    return codes, labels if conditional else None


def _load_npy(path):
    if not os.path.isfile(path):
        raise UsageError(f"no {path}: train the prior again with --restart")
    try:
        return np.load(path)
    except Exception as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def check_labels(labels, config: Config, n, source="labels"):
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
            or labels.max() >= len(config.classes):
        raise UsageError(f"{source} must hold {n} class ids in [0, {len(config.classes)}), got shape {labels.shape}")
    return labels.astype(np.int32)


def split_validation(tokens, fraction, seed):
    """Seeded hold-out: (train, validation); at least one of each when there are two or more.
    tokens: an array, or a list of arrays of as many rows (split alike)."""
    n = len(tokens[0]) if isinstance(tokens, list) else len(tokens)
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    if isinstance(tokens, list):
        return [t[order[n_val:]] for t in tokens], [t[order[:n_val]] for t in tokens]
    return tokens[order[n_val:]], tokens[order[:n_val]]


def token_dataset(tokens, batch_size, seed, start_step=0, top_codes=None):
    """(N, L+1) token sequences -> endless (inputs tokens[:, :-1], targets tokens[:, 1:] - 1)
    batches in the reference's epochs, from global step start_step on. top_codes (N, top length),
    for a two-level run's bottom prior: the inputs are (tokens[:, :-1], top codes)."""
    length = tokens.shape[1] - 1

    def read(indices):
        batch = tokens[indices]
        return batch[:, :-1], batch[:, 1:] - 1

    def load(indices):
        x, y = tf.numpy_function(read, [indices], (tf.int32, tf.int32), stateful=False)
        x, y = tf.ensure_shape(x, (None, length)), tf.ensure_shape(y, (None, length))
        if top_codes is None:
            return x, y
        top = tf.numpy_function(lambda i: top_codes[i], [indices], tf.int32, stateful=False)
        return (x, tf.ensure_shape(top, (None, top_codes.shape[1]))), y

    return index_dataset(len(tokens), batch_size, seed, start_step).map(load).prefetch(tf.data.AUTOTUNE)


def train_prior(config: Config, run_dir, steps=None, epochs=None, resume=False, callbacks=(), deterministic=False,
                tensorboard=False, overwrite=False, classes=False, strategy=None, data=None, level=None):
    """Train (or resume) the prior of a run directory on its VQ-VAE's codes. Returns the prior.
    data: the images whose codes it learns: an array in [-1, 1], a folder (recorded as
      config.prior_data where it is not the VQ-VAE's), or None: config.prior_data, else
      config.data (the VQ-VAE's folder). On resume the saved RUN/codes.npy is used.
    callbacks, deterministic, tensorboard, overwrite and strategy as for train_vqvae (a run that
    already has a prior; XLA off under a strategy; config.prior_batch_size is the global batch);
    a grid of samples every config.sample_every_epochs epochs (0: never).
    config.prior picks the kind (attention or pixelcnn). classes: a class-conditional prior, each
    image's class its first-level subfolder of the folder (names saved as config.classes).
    level: a two-level run's prior, "top" or "bottom" (RunDir.at_level names its files); the
    bottom one learns under the top code maps and needs the top prior trained first. None: a
    one-level run's, or both of a two-level run's, top first (with resume, the bottom one
    resumes only if it has a checkpoint): the bottom prior is returned."""
    from .priors import build_prior, compile_prior
    from .priors.tokens import START_TOKEN, check_codes, class_tokens, codes_to_tokens

    if config.levels == 2 and level is None:
        bottom = RunDir(run_dir).at_level("bottom")
        resume_bottom = resume and os.path.isfile(bottom.prior_checkpoint)
        if resume and not resume_bottom and bottom.prior_files() and not overwrite:  # before the top prior trains
            raise UsageError(f"{run_dir}'s bottom prior stopped before its first checkpoint: nothing of it to resume; "
                             "train it anew (train.py prior --level bottom --restart; overwrite=True from Python)",
                             "level")
        kwargs = dict(steps=steps, epochs=epochs, callbacks=callbacks, deterministic=deterministic,
                      tensorboard=tensorboard, overwrite=overwrite, classes=classes, strategy=strategy, data=data)
        train_prior(config, run_dir, resume=resume, level="top", **kwargs)
        return train_prior(config, run_dir, resume=resume_bottom, level="bottom", **kwargs)
    config.check_level(level)
    run = open_run(run_dir, config, strategy, True, resume, overwrite,
                   lambda run: run.at_level(level).prior_files(), f"has a{' ' + level if level else ''} prior")
    run = run.at_level(level)
    if level == "bottom" and not os.path.isfile(run.at_level("top").prior_weights):
        raise UsageError(f"{run_dir} has no top prior: the bottom prior is trained after it (train.py prior --level top)",
                         "level")
    seed = config.seed if config.prior_seed is None else config.prior_seed
    writes = writable_run(run, strategy).at_level(level)
    if steps is not None and not resume:  # a warm-up longer than the run is refused before codes.npy is written
        learning_rate(config, steps, prior=True)
    with resumable(writes.prior_checkpoint):
        codes, labels = prior_codes(config, run, resume, classes, writes, data)
    top_codes = None
    if level == "bottom":  # the top maps the bottom prior learns under, flattened
        top = run.at_level("top").codes
        top_codes = check_codes(_load_npy(top), config, top, "top")
        if len(top_codes) != len(codes):
            raise UsageError(f"{top} holds {len(top_codes)} code maps, {run.codes} {len(codes)}: train the priors "
                             "again with --restart")
        top_codes = top_codes.reshape(len(codes), -1)
    num_codes = config.top_codes if level == "top" else config.num_codes
    first = START_TOKEN if labels is None else class_tokens(labels, num_codes)  # the class is the start
    tokens = codes_to_tokens(codes, first)
    train_tokens, val_tokens = split_validation(tokens if top_codes is None else [tokens, top_codes],
                                                config.val_split, seed)
    train_top = val_top = None
    if top_codes is not None:
        (train_tokens, train_top), (val_tokens, val_top) = train_tokens, val_tokens
    batch_size = config.prior_batch_size
    steps_per_epoch = math.ceil(len(train_tokens) / batch_size)
    total = resolve_total_steps(steps, epochs, steps_per_epoch)
    if deterministic:
        seed_everything(seed, config.prior_jit_compile)

    what = f"{level} prior" if level else "prior"
    prior, state = build_and_resume(lambda lr_steps: compile_prior(build_prior(config, level), config, lr_steps),
                                    strategy, run.prior_checkpoint, resume, total, what,
                                    total_given=steps is not None or epochs is not None,
                                    decays=config.prior_lr_schedule == "cosine")
    if state is None:
        return prior
    start, total = state["step"], state["total"]
    config.save(writes.config)
    board = TensorBoardWriter(writes.path("tensorboard", "prior")) if tensorboard else None
    lr = ["lr"] if config.lr_scheduled(prior=True) else []  # the epoch's last step's
    log = StepLog(writes.prior_log, PRIOR_KEYS + ["val_nll"] + lr, steps_per_epoch, start, resume, board)
    log.set_model(prior)  # not a callback here: it gets one row per epoch, from PriorEpochs

    def save(step, logs=None):
        if step > 0:
            save_state(prior, writes.prior_weights, writes.prior_checkpoint, step,
                       {"total": total, "lr_steps": state["lr_steps"]})

    run_callbacks = [
        *([LearningRate()] if lr else []),  # before PriorEpochs, which logs it
        Every(config.sample_every, save, start),
        PriorEpochs(config, run, writes, (val_tokens, val_top), log, board, start, total, steps_per_epoch, seed),
    ]
    with stage_files(writes, strategy, board):
        fit_stage(prior, token_dataset(train_tokens, batch_size, seed, start, train_top), start, total, run_callbacks,
                  callbacks, save, writes.prior_checkpoint, strategy, PRIOR_KEYS, what, reset_every=steps_per_epoch)
    return prior


class PriorEpochs(StepCallback):
    """At the end of each epoch (and of training): the validation NLL, a log row, and every
    config.sample_every_epochs epochs a grid of random samples (a two-level run: the bottom
    prior's stage draws under the trained top prior's samples; the top prior's stage draws none,
    as its codes alone do not decode)."""

    def __init__(self, config, run, writes, validation, log, board, start, total, steps_per_epoch, seed):
        super().__init__(start)
        self.config, self.run, self.writes, self.log, self.board = config, run, writes, log, board
        self.val_tokens, self.val_top = validation  # the top codes: the bottom prior's, else None
        self.total, self.steps_per_epoch, self.seed = total, steps_per_epoch, seed
        self.vqvae = self.top_prior = None  # loaded for the first grid

    def on_step(self, step, logs):
        if step % self.steps_per_epoch == 0 or step == self.total:
            self.end_of_epoch(step, logs)

    def end_of_epoch(self, step, logs):
        from .grids import codes_grid
        from .priors.sampling import sample_codes, sample_levels
        from .priors.tokens import prior_nll

        epoch = (step - 1) // self.steps_per_epoch
        batch_size = self.config.prior_batch_size
        val_nll = prior_nll(self.model, self.val_tokens, batch_size, self.val_top) if len(self.val_tokens) else None
        self.log.append(step, {**logs, "val_nll": val_nll})
        self.log.flush()
        level = f"{self.run.level} " if self.run.level else ""
        tqdm.write(f"{level}prior epoch {epoch}: loss {float(logs.get('loss', np.nan)):.4f}, "
                   f"accuracy {float(logs.get('accuracy', np.nan)):.4f}"
                   + (f", val_nll {val_nll:.4f}" if val_nll is not None else ""))
        every = self.config.sample_every_epochs
        if every and ((epoch + 1) % every == 0 or step == self.total) and self.run.level != "top":
            if self.vqvae is None:
                self.vqvae = load_vqvae(self.config, self.run)
            if self.run.level == "bottom":
                if self.top_prior is None:
                    self.top_prior = load_prior(self.config, self.run, "top")
                codes = sample_levels(self.top_prior, self.model, 64, seed=self.seed + epoch)
            else:
                codes = sample_codes(self.model, 64, self.config.grid_shape, seed=self.seed + epoch)
            grid = codes_grid(self.vqvae, codes)
            save_png(os.path.join(self.writes.samples, f"prior_sample_{epoch}.png"), grid)
            if self.board is not None:
                self.board.images(step, {"prior_sample": grid})
                self.board.flush()
