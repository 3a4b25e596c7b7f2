"""The priors over code maps: the reference's attention prior and a gated PixelCNN.

    tokens.py     the token protocol both read and write, and their likelihood (prior_nll)
    sampling.py   sample_codes, draw, and Sampler: what a prior's own sampler provides
    attention.py  the attention prior (Prior), its layers, its cached sampler
    pixelcnn.py   the gated PixelCNN, its row sampler

Each module imports only those above it in this list; `build_prior` and `compile_prior` (here)
pick and compile the config's kind.
"""

import keras

from .. import backend
from ..config import Config
from ..models import learning_rate, seeded_initializers
from .attention import Prior
from .pixelcnn import PixelCNN


def build_prior(config: Config, level=None) -> keras.Model:
    """The config's prior (attention, the reference, or pixelcnn): int tokens (batch, length <= h*w)
    -> (batch, length, num_codes) next-code probabilities. The initial weights follow the prior's
    seed (config.prior_seed, else config.seed).
    A two-level run (levels 2) has one per level: level "top" over the top code maps (h/2 x w/2,
    top_num_codes; class-conditional where config.classes says), level "bottom" over the bottom
    ones, conditioned on the whole top map (condition.TopCondition)."""
    config.validate()
    config.check_level(level)
    h, w = config.top_grid_shape if level == "top" else config.grid_shape
    num_codes = config.top_codes if level == "top" else config.num_codes
    classes = None if level == "bottom" else config.classes
    condition = (*config.top_grid_shape, config.top_codes) if level == "bottom" else None
    seed = config.seed if config.prior_seed is None else config.prior_seed
    with seeded_initializers(seed + (level == "bottom")):  # the two levels' priors start apart
        if config.prior == "pixelcnn":
            return PixelCNN(h, w, num_codes, config.pixelcnn_width, config.pixelcnn_depth, config.pixelcnn_kernel,
                            classes, condition=condition)
        return Prior(h, w, num_codes, config.prior_dim, config.prior_heads, config.prior_head_dim, config.prior_depth,
                     classes, condition=condition)


def compile_prior(prior: keras.Model, config: Config, total_steps=None) -> keras.Model:
    """Compile a prior for training on (tokens[:, :-1], codes): Adam at config.prior_lr (or its
    schedule over total_steps, models.learning_rate), sparse categorical cross-entropy on its
    probabilities (the reference's loss), accuracy logged as "accuracy", XLA as
    config.prior_jit_compile says. Returns the prior."""
    prior.compile(optimizer=keras.optimizers.Adam(learning_rate(config, total_steps, prior=True)),
                  loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=backend.jit_compile(config.prior_jit_compile))
    return prior
