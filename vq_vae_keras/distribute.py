"""Several devices and several machines with tf.distribute: choosing a strategy, and the few
facts the rest of the package asks of it (is this the chief? are there several replicas?).

    strategy = vqk.make_strategy("mirrored")             # every local GPU
    strategy = vqk.make_strategy("mirrored", cpu_replicas=2)  # the CPU split in two (tests, trying it)
    strategy = vqk.make_strategy("multiworker")           # one process per machine, from TF_CONFIG
    vqk.train_vqvae(config, "runs/x", strategy=strategy)  # config.batch_size is the global batch
"""

import contextlib
import json
import os
import threading

import keras
import tensorflow as tf
from keras import ops

from . import backend
from .backend import require_tensorflow
from .errors import UsageError, warn

KINDS = ("none", "mirrored", "multiworker")


def split_cpu(replicas):
    """Make the first CPU `replicas` logical devices. TensorFlow allows it only before it has
    initialised its devices (before the first op of the process)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != replicas:
            raise UsageError("cpu_replicas: TensorFlow has already started in this process; split the CPU "
                             "before the first TensorFlow operation (a fresh process)") from None


def make_strategy(kind, cpu_replicas=None):
    """A tf.distribute strategy, or None for "none" (one device, no strategy). Under JAX, mirrored
    sets Keras's DataParallel instead and returns None (jax_data_parallel).

    mirrored: tf.distribute.MirroredStrategy over every local GPU (the CPU when there is none),
      or over `cpu_replicas` logical CPU devices when given.
    multiworker: tf.distribute.MultiWorkerMirroredStrategy, the cluster read from the TF_CONFIG
      environment variable (one process per machine, each with its local GPUs or its CPU)."""
    if kind not in KINDS:
        raise UsageError(f"distribute must be one of {', '.join(KINDS)}, got {kind!r}")
    if cpu_replicas is not None and kind != "mirrored":
        raise UsageError("cpu_replicas applies to the mirrored strategy only")
    if kind == "none":
        return None
    if backend.name() == "jax":
        return jax_data_parallel(kind, cpu_replicas)
    require_tensorflow(f"distribute {kind} (tf.distribute)")
    if kind == "mirrored":
        if cpu_replicas is None:
            return tf.distribute.MirroredStrategy()
        split_cpu(cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()


def jax_data_parallel(kind, cpu_replicas):
    """Under JAX, "mirrored" is Keras's own data parallelism: keras.distribution.DataParallel over
    every local device, set for the process (before the models are built). Returns None: nothing
    more to pass, Keras splits each global batch over the devices. The step stays one program over
    the global batch, so the codebook's statistics and BatchNorm's are the global batch's, as on
    one device."""
    if kind != "mirrored":
        require_tensorflow(f"distribute {kind} (tf.distribute; under JAX, mirrored spans the local devices)")
    if cpu_replicas is not None:
        raise UsageError("cpu_replicas: under JAX, split the CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "in the environment, then distribute mirrored")
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return None


def batch_devices():
    """How many devices a Keras distribution (JAX's mirrored) splits each batch over: 1 without one."""
    distribution = keras.distribution.distribution()
    return 1 if distribution is None else distribution.device_mesh.devices.size


def check_global_batch(batch_size, field):
    """UsageError unless a Keras distribution (JAX's mirrored) splits batch_size evenly over its devices."""
    devices = batch_devices()
    if batch_size % devices:
        raise UsageError(f"{field} {batch_size} must be a multiple of the {devices} devices it is split over", field)


def whole_device_batch(batch_size):
    """batch_size rounded up to a multiple of the devices a Keras distribution (JAX's mirrored)
    splits each batch over; batch_size itself without one."""
    devices = batch_devices()
    return -(-batch_size // devices) * devices


def check_tf_config():
    """A missing or malformed TF_CONFIG is a one-line error, not a hang or a traceback."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise UsageError("multiworker needs the TF_CONFIG environment variable (cluster and task); see the README's Scaling section")
    try:
        spec = json.loads(text)
        cluster, task = spec["cluster"], spec["task"]
        workers = cluster[task["type"]]
        workers[int(task["index"])]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"TF_CONFIG is not a cluster with this task in it ({type(e).__name__}: {e})") from None


def is_chief(strategy=None):
    """Whether this process writes the run directory: always without a strategy or with one
    machine; under MultiWorkerMirroredStrategy only the chief (worker 0 when no "chief" is named)."""
    return strategy is None or strategy.extended.should_checkpoint


# Inside a distributed step (a replica context): what the layers need to compute over the global batch.

def _replica_context():
    """tf.distribute's replica context when several replicas run this step, else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def replica_sum(x):
    """x summed over the replicas of a distributed step (all-reduce); x itself on one device."""
    context = _replica_context()
    return x if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def replica_rows(n):
    """(first, total) for this replica's n rows of the global batch: the global index of its first
    row (replicas hold consecutive slices, in replica order) and the global batch size."""
    context = _replica_context()
    if context is None:
        return 0, n
    sizes = context.all_gather(ops.reshape(ops.cast(n, "int32"), (1,)), axis=0)  # (replicas,)
    before = ops.arange(context.num_replicas_in_sync) < context.replica_id_in_sync_group
    return ops.sum(ops.where(before, sizes, 0)), ops.sum(sizes)


class ReplicaLocalLosses:
    """Mixin for a Keras layer that calls add_loss: its added losses are kept per thread.

    MirroredStrategy traces each replica's step in a thread of its own, and Keras keeps a layer's
    added losses in one list on the layer (`Layer._losses`, the same from Keras 3.9 to 3.15): a
    replica's total, and so the logged `loss`, then took in other replicas' terms too. (Gradients were right: each replica's tape records only its own
    thread's operations.) One device: one thread, Keras's behaviour unchanged."""

    @property
    def _losses(self):
        state = thread_state(self)
        if not hasattr(state, "losses"):
            state.losses = []
        return state.losses

    @_losses.setter
    def _losses(self, value):
        thread_state(self).losses = value


def thread_state(layer):
    """A namespace of the layer's own for this thread (for this replica, under MirroredStrategy)."""
    return vars(layer).setdefault("_replica_local", threading.local())  # vars(): not tracked by Keras


# ---------------------------------------------------------------- training under a strategy

def xla_off_under(strategy, config, field):
    """The one rule for XLA and tf.distribute, the same from train.py and from Python: under a
    strategy the training step runs without XLA (config.<field> is set False, and recorded so).
    Keras compiles the whole step, strategy.run included, and XLA refuses a function whose
    variables live on several devices."""
    if strategy is not None and getattr(config, field):
        warn(f"{field}: XLA does not compile a distributed training step; training without it")
        setattr(config, field, False)


def strategy_scope(strategy):
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def distributed(dataset, strategy):
    """Batches are global batches: each worker keeps its replicas' slices of every batch (not
    whole batches of its own, which tf.data's default would pick for a dataset that reads no files)."""
    if strategy is None:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def vector_logs(model, strategy):
    """Keras 3 reduces a multi-worker step's logs with strategy.reduce(MEAN, axis=0), which fails
    on scalars: the step's logs are given shape (1,), and come back as scalars."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        step = model.train_step
        model.train_step = lambda data: {k: keras.ops.reshape(v, (1,)) for k, v in step(data).items()}
