"""What differs between Keras's backends (TensorFlow, JAX, PyTorch), in one place.

The models, fit(x), weight files and the training loop run on all three; TensorFlow stays a
dependency whatever the backend (tf.data feeds fit, tf.summary writes TensorBoard files).
"""

import contextlib

import keras

from .errors import UsageError


def name() -> str:
    """The Keras backend of this process: "tensorflow", "jax" or "torch" (KERAS_BACKEND)."""
    return keras.backend.backend()


def jit_compile(xla):
    """compile()'s jit_compile for a config's XLA flag: the flag itself on TensorFlow (XLA or not);
    Keras's "auto" on the others, which compiles JAX's step with jax.jit (uncompiled it is several
    times slower) and runs PyTorch's eagerly."""
    return xla if name() == "tensorflow" else "auto"


def sync_variables(model):
    """Make the model's variables current before code reads or sets them in the middle of fit.
    JAX's fit keeps the training state outside the variables between steps; Keras's jax_state_sync
    puts it back, and the next step reads it from them again. Reading a callback's `self.model`
    does this already; this is for code that reaches the variables another way (a layer, a
    closure, the model after fit was interrupted). A no-op on the other backends."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def require_tensorflow(what):
    """UsageError unless this process runs Keras on TensorFlow: for what only TensorFlow does."""
    if name() != "tensorflow":
        raise UsageError(f"{what} needs Keras's TensorFlow backend, and this process runs {name()}: "
                         f"set KERAS_BACKEND=tensorflow (the default)")


def no_grad():
    """A context for eager inference outside predict (the samplers of the JAX and PyTorch
    backends): PyTorch records nothing for a backward pass; nothing to do on the others."""
    if name() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
