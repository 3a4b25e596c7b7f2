"""What conditions a two-level run's bottom prior on the top code map (VQ-VAE-2)."""

import keras
from keras import layers, ops

from .tokens import PACKAGE


def dilations(size):
    """1, 2, 4, ...: the dilations of 3x3 convolutions that, stacked, reach across `size`
    positions (a reach of their sum on each side)."""
    found = [1]
    while sum(found) < size - 1:
        found.append(2 * found[-1])
    return found


@keras.saving.register_keras_serializable(package=PACKAGE)
class TopCondition(keras.layers.Layer):
    """VQ-VAE-2's conditioning of the bottom prior on the whole top code map (a departure, for
    two-level runs): top codes (batch, height * width) of the top grid -> (batch, 4 * height *
    width, dim), one vector per position of the bottom grid (twice as high and wide), row-major.
    Both prior kinds use it: the attention prior adds the vectors to its token embeddings, the
    PixelCNN turns them into a bias of every gate (GatedLayer).

    The top codes' embeddings pass a stack of residual 3x3 convolutions over the top grid, dilated
    1, 2, 4, ... until each top position sees every other (the top map is known whole: later top
    codes too), then each covers the 2x2 bottom positions under it. So every bottom position sees
    the whole top map, and the bottom codes before it only, through the prior's causal layers.
    """

    def __init__(self, height, width, num_codes, dim, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width, self.num_codes, self.dim = height, width, num_codes, dim
        self.embedding = layers.Embedding(num_codes, dim, name="top_code_embedding")
        self.convs = [layers.Conv2D(dim, 3, padding="same", dilation_rate=d, name=f"top_code_conv{i}")
                      for i, d in enumerate(dilations(max(height, width)))]

    def build(self, input_shape):
        self.embedding.build(input_shape)
        for conv in self.convs:
            conv.build((None, self.height, self.width, self.dim))

    def call(self, top_codes):
        x = ops.reshape(self.embedding(top_codes), (-1, self.height, self.width, self.dim))
        for conv in self.convs:
            x = x + conv(ops.relu(x))
        x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
        return ops.reshape(x, (-1, 4 * self.height * self.width, self.dim))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 4 * self.height * self.width, self.dim)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width, "num_codes": self.num_codes,
                "dim": self.dim}
