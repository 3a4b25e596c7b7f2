"""requirements.txt's floors against the APIs the project calls.

The real check is .ci/run, which runs the whole suite again with every floor installed in a
throwaway venv (TensorFlow 2.16.2, Keras 3.9.2, NumPy 1.26.0, Pillow 10.0.0, imageio 2.31.0,
tqdm 4.66.0, pytest 8.0.0 passed there). This table is the cheap, always-on half: each API whose
first version is later than the oldest release a user might plausibly have, the release that
brought it (read from the released wheels), and a probe that the API is really there.
"""

import os
import re

import pytest

from conftest import ROOT


def version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def floors():
    """{package: floor} from requirements.txt's "name>=X" lines."""
    found = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def probe_keras(name):
    import keras
    obj = keras
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def optimizer_slot_named_after_path():
    import keras
    layer = keras.layers.Dense(2, name="probe_dense")
    layer.build((None, 3))
    optimizer = keras.optimizers.Adam()
    optimizer.build(layer.trainable_variables)
    return any(v.name == "probe_dense_kernel_momentum" for v in optimizer.variables)


# (package, first version with it, what the project uses, probe on the installed version)
API_TABLE = [
    ("keras", "3.9.0", "keras.remat (layers.py: chunked attention recomputed in the backward pass)",
     lambda: probe_keras("remat")),
    ("keras", "3.9.2", "keras.remat inside models (3.9.2 fixed Layer.rematerialized_call)",
     lambda: probe_keras("remat")),
    ("keras", "3.0.0", "keras.ops.slice_update, keras.random.SeedGenerator, keras.saving.register_keras_serializable",
     lambda: [probe_keras(n) for n in ("ops.slice_update", "random.SeedGenerator", "saving.register_keras_serializable")]),
    ("keras", "3.0.0", "optimizer slots named after the variable's path (io.py's checkpoint names)",
     lambda: optimizer_slot_named_after_path() or pytest.fail("slot names changed")),
    ("keras", "3.0.0", "BatchNormalization(synchronized=) (models.py: --sync-batchnorm)",
     lambda: "synchronized" in __import__("inspect").signature(probe_keras("layers.BatchNormalization")).parameters
     or pytest.fail("no synchronized BatchNorm")),
    ("tensorflow", "2.16.1", "Keras 3 (TensorFlow < 2.16 installs Keras 2)",
     lambda: version(__import__("tensorflow").__version__) >= (2, 16) or pytest.fail("TensorFlow < 2.16")),
    ("tensorflow", "2.9.0", "tf.config.experimental.enable_op_determinism",
     lambda: __import__("tensorflow").config.experimental.enable_op_determinism),
    ("numpy", "1.17.0", "np.random.default_rng, np.random.SeedSequence",
     lambda: __import__("numpy").random.SeedSequence),
    ("pillow", "6.0.0", "PIL.ImageOps.exif_transpose", lambda: __import__("PIL.ImageOps").ImageOps.exif_transpose),
    ("imageio", "2.16.0", "imageio.v3.imwrite(..., extension=)", lambda: __import__("imageio.v3").v3.imwrite),
]


@pytest.mark.parametrize("package, first, what, probe", API_TABLE, ids=[row[2][:40] for row in API_TABLE])
def test_each_floor_has_the_apis_the_project_calls(package, first, what, probe):
    floor = floors()[package]
    assert version(floor) >= version(first), f"requirements.txt allows {package} {floor}, but {what} needs {first}"
    probe()


def test_every_requirement_has_a_floor_and_a_cap():
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements.txt")) if line.strip()
             and not line.startswith("#")]
    assert len(lines) == len(floors()) == 7
    assert all("<" in line for line in lines), "every dependency needs an upper bound too"


def test_installed_versions_are_within_the_floors():
    import importlib.metadata as metadata
    for package, floor in floors().items():
        assert version(metadata.version(package)) >= version(floor), package
