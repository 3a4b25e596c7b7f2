"""A gated PixelCNN prior over code maps (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), the prior of the VQ-VAE paper, as an option to the attention prior.

Same interface as the attention prior (the token protocol of tokens.py): int tokens (batch,
length <= h*w), token 0 the start token (or a class token), code k token k+1 -> (batch, length,
num_codes) probabilities of the next code; so training, validation NLL, checkpoints and
`load_run` treat both alike.

Two stacks, no blind spot. The vertical stack at row r sees only rows above r: its input is the
embedded code map shifted down one row, and its convolutions (k//2 + 1 rows x k columns) reach
only up. The horizontal stack at (r, c) sees row r left of c: its input is the map shifted right
one column (the first layer's type-A mask, as a shift), its convolutions (1 x k//2 + 1) reach only
left, and every layer adds the vertical stack's pre-activation at the same position (1x1).
Each layer gates both stacks with tanh * sigmoid; the horizontal one is residual. Class
conditioning adds a learned per-class bias to every gate's pre-activation, in both stacks; a
two-level run's bottom prior adds a bias map, a 1x1 convolution of the top code map's vectors
(condition.TopCondition) at each position, as the paper's conditional PixelCNN does.

Sampling (`RowSampler`) runs the same layers on small windows instead of whole maps: once per
row, each layer's vertical output for that row from the rows above it; per position, each
layer's horizontal output at that position from the k//2 + 1 to its left. Exactly the full
model's computation, at about a (h*w)-th of its cost per code.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from .. import backend
from .condition import TopCondition
from .sampling import Sampler, draw, draw_numpy
from .tokens import PACKAGE, class_vectors, split_class_tokens


def gate(x):
    """(..., 2C) -> (..., C): tanh(first half) * sigmoid(second half)."""
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedLayer(keras.layers.Layer):
    """One gated layer of both stacks, on maps of `width` channels with a k x k receptive step.

    call(v, h, classes, condition) -> (v', h'): v, h (batch, rows, cols, width) whole (shifted)
    stacks; classes (batch,) int, or None; condition (conditioned=True): (batch, rows, cols, width)
    vectors of the top code map at each position, or None. The pieces (`vertical`, `horizontal`)
    run the same computation on windows, for the sampler.
    """

    def __init__(self, width, kernel, num_classes=0, conditioned=False, **kwargs):
        super().__init__(**kwargs)
        self.width, self.kernel, self.num_classes, self.conditioned = width, kernel, num_classes, conditioned
        reach = kernel // 2
        self.vertical_conv = layers.Conv2D(2 * width, (reach + 1, kernel), name="vertical")
        self.horizontal_conv = layers.Conv2D(2 * width, (1, reach + 1), name="horizontal")
        self.link = layers.Conv2D(2 * width, 1, name="link")  # vertical pre-activation -> horizontal
        self.residual = layers.Conv2D(width, 1, name="residual")
        if num_classes:
            self.vertical_class = layers.Embedding(num_classes, 2 * width, name="vertical_class")
            self.horizontal_class = layers.Embedding(num_classes, 2 * width, name="horizontal_class")
        if conditioned:
            self.vertical_condition = layers.Conv2D(2 * width, 1, name="vertical_condition")
            self.horizontal_condition = layers.Conv2D(2 * width, 1, name="horizontal_condition")

    def build(self, input_shape):
        reach, width = self.kernel // 2, self.width
        self.vertical_conv.build((None, reach + 1, None, width))
        self.horizontal_conv.build((None, 1, reach + 1, width))
        self.link.build((None, 1, 1, 2 * width))
        self.residual.build((None, 1, 1, width))
        if self.num_classes:
            self.vertical_class.build((None,))
            self.horizontal_class.build((None,))
        if self.conditioned:
            self.vertical_condition.build((None, 1, 1, width))
            self.horizontal_condition.build((None, 1, 1, width))

    def call(self, v, h, classes=None, condition=None):
        reach = self.kernel // 2
        v_pre = self.vertical_pre(self.vertical_conv(ops.pad(v, [[0, 0], [reach, 0], [reach, reach], [0, 0]])),
                                  condition)
        h_conv = self.horizontal_conv(ops.pad(h, [[0, 0], [0, 0], [reach, 0], [0, 0]]))
        return self.vertical(v_pre, classes), self.horizontal(h_conv, v_pre, h, classes, condition)

    def vertical_pre(self, v_conv, condition=None):
        """The vertical stack's pre-activation: its convolution's output (batch, rows, cols, 2C),
        plus the top map's bias where conditioned (which the link carries to the horizontal stack)."""
        return v_conv + self.vertical_condition(condition) if self.conditioned else v_conv

    def vertical(self, v_pre, classes):
        """The vertical stack's output from its pre-activation (batch, rows, cols, 2C)."""
        if self.num_classes:
            v_pre = v_pre + class_vectors(self.vertical_class, classes)[:, None, None, :]
        return gate(v_pre)

    def horizontal(self, h_conv, v_pre, h, classes, condition=None):
        """The horizontal stack's output: h plus the gated sum of its convolution, the link from
        the vertical pre-activation at the same positions and the class and top-map biases."""
        pre = h_conv + self.link(v_pre)
        if self.num_classes:
            pre = pre + class_vectors(self.horizontal_class, classes)[:, None, None, :]
        if self.conditioned:
            pre = pre + self.horizontal_condition(condition)
        return h + self.residual(gate(pre))

    def get_config(self):
        config = {**super().get_config(), "width": self.width, "kernel": self.kernel, "num_classes": self.num_classes}
        if self.conditioned:
            config["conditioned"] = True
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelCNN(keras.Model):
    """The gated PixelCNN prior: int tokens (batch, length <= height * width), 0 = start token (or
    num_codes + 1 + c for class c, see tokens.class_tokens), code k = token k + 1 ->
    (batch, length, num_codes) next-code probabilities.
    With condition = (top height, top width, top codes) (a two-level run's bottom prior), the
    inputs are [tokens, top codes (batch, top height * top width)], and every gate has the top
    map's bias (GatedLayer)."""

    def __init__(self, height, width, num_codes, channels=128, depth=16, kernel=5, classes=None, name="prior",
                 condition=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.height, self.width, self.num_codes = height, width, num_codes
        self.channels, self.depth, self.kernel = channels, depth, kernel
        self.classes = tuple(classes) if classes else None  # a tuple: Keras does not track it
        self.condition = tuple(condition) if condition else None
        num_classes = len(self.classes or ())
        self.embedding = layers.Embedding(num_codes + 1, channels, name="code_embedding")
        if self.condition:
            self.top_condition = TopCondition(*self.condition, channels, name="top_condition")
        self.gated = [GatedLayer(channels, kernel, num_classes, bool(self.condition), name=f"gated{i}")
                      for i in range(depth)]
        self.hidden = layers.Dense(channels, activation="relu", name="hidden")
        self.next_code = layers.Dense(num_codes, name="next_code")
        tokens = ops.zeros((1, height * width), "int32")
        self(tokens if not self.condition else [tokens, ops.zeros((1, condition[0] * condition[1]), "int32")])  # builds every weight

    def condition_map(self, top_codes):
        """A conditioned prior's top map vectors (batch, height, width, channels)."""
        return ops.reshape(self.top_condition(top_codes), (-1, self.height, self.width, self.channels))

    def call(self, inputs):
        tokens, condition = (inputs[0], self.condition_map(inputs[1])) if self.condition else (inputs, None)
        length = self.height * self.width
        tokens, classes = split_class_tokens(tokens, self.num_codes)
        classes, n = classes[:, 0], ops.shape(tokens)[1]
        # Position p holds code p - 1 (token 0 is the start): the codes are tokens[:, 1:]; positions
        # past the input are padded (nothing before them sees them), so any length <= h*w works.
        codes = ops.pad(tokens[:, 1:], [[0, 0], [0, length - n + 1]])
        x = ops.reshape(self.embedding(codes), (-1, self.height, self.width, self.channels))
        v = ops.pad(x[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0]])  # down one row: rows above only
        h = ops.pad(x[:, :, :-1], [[0, 0], [0, 0], [1, 0], [0, 0]])  # right one column: left only
        for layer in self.gated:
            v, h = layer(v, h, classes, condition)
        logits = self.logits(h)
        return ops.softmax(ops.reshape(logits, (-1, length, self.num_codes))[:, :n], axis=-1)

    def logits(self, h):
        return self.next_code(self.hidden(ops.relu(h)))

    def sampler(self):
        """This prior's `RowSampler`, made on first use and kept for the prior's lifetime."""
        return RowSampler.of(self)

    def get_config(self):
        config = {"height": self.height, "width": self.width, "num_codes": self.num_codes, "channels": self.channels,
                  "depth": self.depth, "kernel": self.kernel, "classes": list(self.classes or ()) or None,
                  "name": self.name}
        if self.condition:
            config["condition"] = list(self.condition)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def window(x, start, size, axis):
    """`size` entries of x along axis from start, a tensor: a gather, so that one compiled program
    serves every start (tf.slice asks XLA for its start as a compile-time constant: one
    compilation per row)."""
    return ops.take(x, start + ops.arange(size), axis=axis)


class RowSampler(Sampler):
    """The PixelCNN's sampler: draws code maps row by row. One XLA-compiled function (`compiled`)
    serves every row (the row, seed and options are tensors), with a loop over the row's
    positions inside.

    State between rows: each layer's vertical-stack input, padded as the full model pads it,
    (batch, k//2 + h + 1, k//2 + w + k//2, C): the rows drawn so far and zeros elsewhere (the
    last row is scratch space for the write after the final row)."""

    def sample(self, batch, seed, temperature, top_k, top_p, classes=None, top_codes=None):
        model = self.model
        reach, h, w = model.kernel // 2, model.height, model.width
        shape = (batch, reach + h + 1, 2 * reach + w, model.channels)
        classes = np.full(batch, -1) if classes is None else classes
        if not self.compiles:
            return self.sample_eagerly(shape, ops.convert_to_tensor(classes, "int32"), (seed, temperature, top_k, top_p),
                                       top_codes)
        stacks = [tf.zeros(shape, model.compute_dtype) for _ in range(model.depth)]
        codes = tf.zeros((batch, h * w), tf.int32)
        classes = tf.constant(classes, tf.int32)
        options = (tf.constant(seed, tf.int64), tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                   tf.constant(top_p, tf.float32))
        # A conditioned prior's top map vectors, once for every row.
        condition = () if top_codes is None else \
            (model.condition_map(tf.constant(np.reshape(top_codes, (batch, -1)), tf.int32)),)
        for row in range(h):
            stacks, codes = self.call(tf.constant(row), stacks, codes, classes, *options, *condition)
        return codes.numpy()

    def sample_eagerly(self, shape, classes, options, top_codes=None):
        """`sample` on the JAX and PyTorch backends: `one_row` run eagerly, a Python loop over
        the positions, each code drawn in NumPy (draw_numpy)."""
        model, batch = self.model, shape[0]

        def draw_code(logits, position):
            return ops.convert_to_tensor(draw_numpy(ops.convert_to_numpy(logits), *options[1:], options[0], position))

        def loop(body, state):
            for _ in range(model.width):
                state = body(*state)
            return state

        with backend.no_grad():
            stacks = [ops.zeros(shape, model.compute_dtype) for _ in range(model.depth)]
            codes = ops.zeros((batch, model.height * model.width), "int32")
            condition = () if top_codes is None else \
                (model.condition_map(ops.convert_to_tensor(np.reshape(top_codes, (batch, -1)), "int32")),)
            for row in range(model.height):
                stacks, codes = self.one_row(row, stacks, codes, classes, condition, draw_code, loop)
        return ops.convert_to_numpy(codes)

    def compiled(self, row, stacks, codes, classes, seed, temperature, top_k, top_p, *condition):
        """One row: (stacks, codes) with the row's codes drawn and written into both. condition: a
        conditioned prior's top map vectors (batch, h, w, C), else none (the signature stays the
        unconditioned prior's)."""
        def draw_code(logits, position):
            return draw(logits, temperature, top_k, top_p, seed, position)

        def loop(body, state):
            return tf.while_loop(lambda col, *_: col < self.model.width, body, state)

        return self.one_row(row, stacks, codes, classes, condition, draw_code, loop)

    def one_row(self, row, stacks, codes, classes, condition, draw_code, loop):
        """The row's codes drawn, left to right, and written into (stacks, codes): `compiled`'s
        body, with its draw (draw_code(logits, position) -> codes) and its loop over the
        positions (loop(body, state) -> state) as arguments."""
        model = self.model
        reach, w, channels = model.kernel // 2, model.width, model.channels
        batch = ops.shape(codes)[0]
        row_condition = window(condition[0], row, 1, axis=1) if condition else None  # (batch, 1, w, C)
        # The vertical stack at this row, layer by layer, from the k//2 + 1 padded rows ending at it.
        stacks, links = list(stacks), []
        for i, layer in enumerate(model.gated):
            v_pre = layer.vertical_pre(layer.vertical_conv(window(stacks[i], row, reach + 1, axis=1)), row_condition)
            links.append(v_pre)  # (batch, 1, w, 2C)
            if i + 1 < model.depth:
                stacks[i + 1] = ops.slice_update(stacks[i + 1], [0, row + reach, reach, 0], layer.vertical(v_pre, classes))
        # The horizontal stacks of this row, padded left: each layer's input, filled as positions are drawn.
        lines = [ops.zeros((batch, 1, reach + w + 1, channels), model.compute_dtype) for _ in range(model.depth)]

        def body(col, lines, first_stack, codes):
            lines = list(lines)
            here_condition = window(row_condition, col, 1, axis=2) if condition else None
            for i, layer in enumerate(model.gated):
                h_conv = layer.horizontal_conv(window(lines[i], col, reach + 1, axis=2))
                link = window(links[i], col, 1, axis=2)
                here = window(lines[i], col + reach, 1, axis=2)
                out = layer.horizontal(h_conv, link, here, classes, here_condition)
                if i + 1 < model.depth:
                    lines[i + 1] = ops.slice_update(lines[i + 1], [0, 0, col + reach, 0], out)
            position = row * w + col
            code = draw_code(model.logits(out)[:, 0, 0], position)
            codes = ops.slice_update(codes, [0, position], code[:, None])
            x = ops.cast(model.embedding(code + 1), model.compute_dtype)[:, None, None, :]
            lines[0] = ops.slice_update(lines[0], [0, 0, col + 1 + reach, 0], x)  # right of it
            first_stack = ops.slice_update(first_stack, [0, row + 1 + reach, col + reach, 0], x)  # below it
            return col + 1, lines, first_stack, codes

        _, _, stacks[0], codes = loop(body, (0, lines, stacks[0], codes))
        return stacks, codes

