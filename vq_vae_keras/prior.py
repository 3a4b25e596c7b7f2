"""The attention prior over code maps (the reference's c_model, "PixelAtt").

A code map (h, w) is flattened row-major, shifted by +1 and given a start token 0:
tokens (h*w + 1,). The model reads tokens[:, :-1] and predicts the codes tokens[:, 1:] - 1.
"""

import keras
import numpy as np
from keras import layers
from tqdm.auto import tqdm

from .config import Config
from .errors import UsageError
from .layers import CausalSelfAttention, GridPositionEmbedding

START_TOKEN = 0
# The reference's third-party LayerNormalization used epsilon = K.epsilon() ** 2.
LAYER_NORM_EPSILON = 1e-14


def codes_to_tokens(codes):
    """(N, h, w) codes -> (N, h*w + 1) int32 tokens: start token 0, then code + 1."""
    codes = np.asarray(codes, np.int32)
    flat = codes.reshape(len(codes), -1)
    return np.concatenate([np.full((len(codes), 1), START_TOKEN, np.int32), flat + 1], axis=1)


def tokens_to_codes(tokens, grid_shape):
    """(N, h*w + 1) tokens -> (N, h, w) codes."""
    return (np.asarray(tokens, np.int32)[:, 1:] - 1).reshape(-1, *grid_shape)


def check_codes(codes, config: Config, source="codes"):
    h, w = config.grid_shape
    if codes.ndim != 3 or codes.shape[1:] != (h, w) or len(codes) == 0:
        raise UsageError(f"{source} has shape {codes.shape}, this run needs (N, {h}, {w})")
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= config.num_codes:
        raise UsageError(f"{source} must hold integer codes in [0, {config.num_codes})")
    return codes.astype(np.int32)


def build_prior(config: Config) -> keras.Model:
    """int tokens (batch, length <= h*w) -> (batch, length, num_codes) next-code probabilities."""
    config.validate()
    h, w = config.grid_shape
    dim = config.prior_dim
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = layers.Embedding(config.num_codes + 1, dim, name="token_embedding")(tokens)
    x = GridPositionEmbedding(h, w, name="position_embedding")(x)
    x = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="embedding_norm")(x)
    for i in range(config.prior_depth):
        a = CausalSelfAttention(config.prior_heads, config.prior_head_dim, name=f"block{i}_attention")(x)
        a = layers.Dense(dim, activation="relu", name=f"block{i}_dense")(a)
        x = layers.Add(name=f"block{i}_add")([a, x])
        x = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"block{i}_norm")(x)
    probs = layers.Dense(config.num_codes, activation="softmax", name="next_code")(x)
    return keras.Model(tokens, probs, name="prior")


def prior_nll(prior, tokens, batch_size=32):
    """Mean negative log-likelihood per code, in nats, of (N, L+1) token sequences."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size]
        probs = keras.ops.convert_to_numpy(prior(batch[:, :-1], training=False))
        p = np.take_along_axis(probs, (batch[:, 1:] - 1)[..., None], axis=-1)
        total += float(-np.log(np.maximum(p, 1e-12)).sum())
        count += p.size
    return total / max(count, 1)


def encode_folder(vqvae, folder, batch_size=64):
    """Code maps (N, h, w) of every usable image of an ImageFolder, in batches, with a progress bar."""
    codes = []
    for i in tqdm(range(0, len(folder), batch_size), desc="encoding", unit="batch"):
        images = folder.read_batch(range(i, min(i + batch_size, len(folder))))
        if images is not None:
            codes.append(vqvae.quantize(vqvae.encode(images, batch_size), batch_size)[0])
    if not codes:
        raise UsageError(f"no readable images in {folder.folder}")
    return np.concatenate(codes).astype(np.int32)
