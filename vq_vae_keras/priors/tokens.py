"""The token protocol that every prior reads and writes, and the prior's likelihood of tokens.

A code map (h, w) is flattened row-major, shifted by +1 and given a start token: tokens
(h*w + 1,). A prior reads tokens[:, :-1] and predicts the codes tokens[:, 1:] - 1, as
(batch, length, num_codes) probabilities of the next code. Token 0 is the start of an
unconditional sequence; a class-conditional prior starts class c's with token num_codes + 1 + c.
"""

import keras
import numpy as np
from keras import ops

from ..config import Config
from ..errors import UsageError

# The package name under which the priors' layers register with Keras (part of saved files).
PACKAGE = "vq_vae_keras"
START_TOKEN = 0


def codes_to_tokens(codes, start=START_TOKEN):
    """(N, h, w) codes -> (N, h*w + 1) int32 tokens: the start token (one for all, or (N,) of
    them: see class_tokens), then code + 1."""
    codes = np.asarray(codes, np.int32)
    flat = codes.reshape(len(codes), -1)
    first = np.broadcast_to(np.asarray(start, np.int32), (len(codes),))[:, None]
    return np.concatenate([first, flat + 1], axis=1)


def tokens_to_codes(tokens, grid_shape):
    """(N, h*w + 1) tokens -> (N, h, w) codes."""
    return (np.asarray(tokens, np.int32)[:, 1:] - 1).reshape(-1, *grid_shape)


def class_tokens(classes, num_codes):
    """Class ids (N,) -> the start tokens of a class-conditional prior: num_codes + 1 + class.
    Token 0 stays the unconditional start (no class)."""
    return np.asarray(classes, np.int32) + num_codes + 1


def split_class_tokens(tokens, num_codes):
    """int tokens (batch, n) -> (tokens with each class token made the start token 0, class ids
    (batch, n): the class of a class token, -1 elsewhere)."""
    is_class = tokens > num_codes
    return ops.where(is_class, START_TOKEN, tokens), ops.where(is_class, tokens - (num_codes + 1), -1)


def class_vectors(embedding, classes):
    """An Embedding's vectors of class ids (...), -1 for none -> (..., dim), zero for none (the
    class-free positions of both prior kinds)."""
    known = ops.cast(classes >= 0, embedding.compute_dtype)[..., None]
    return embedding(ops.maximum(classes, 0)) * known


def check_codes(codes, config: Config, source="codes", level=None):
    """codes as int32 if they are (N, h, w) integer codes in [0, num_codes) for this config's
    grid (level "top": the top grid and codebook of a two-level run); else UsageError naming source."""
    h, w = config.top_grid_shape if level == "top" else config.grid_shape
    num_codes = config.top_codes if level == "top" else config.num_codes
    if codes.ndim != 3 or codes.shape[1:] != (h, w) or len(codes) == 0:
        raise UsageError(f"{source} has shape {codes.shape}, this run needs (N, {h}, {w})")
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= num_codes:
        raise UsageError(f"{source} must hold integer codes in [0, {num_codes})")
    return codes.astype(np.int32)


def prior_nll(prior, tokens, batch_size=32, top_codes=None):
    """Mean negative log-likelihood per code, in nats, of (N, L+1) token sequences (a two-level
    run's bottom prior: under top_codes (N, top h * top w))."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size]
        inputs = batch[:, :-1] if top_codes is None else [batch[:, :-1], top_codes[i:i + batch_size]]
        probs = keras.ops.convert_to_numpy(prior(inputs, training=False))
        p = np.take_along_axis(probs, (batch[:, 1:] - 1)[..., None], axis=-1)
        total += float(-np.log(np.maximum(p, 1e-12)).sum())
        count += p.size
    return total / max(count, 1)
