"""requirements.txt's floors against the APIs the project calls.

.ci/run runs the whole suite a second time with every floor installed in a throwaway venv, so each
test here checks the installed versions: the newest allowed in the first run, the floors in the
second. `test_every_api_the_package_names_exists` reads the package's source for every dotted name
it takes from a dependency (`keras.ops.slice_update`, `tf.distribute.ReduceOp.SUM`, `from keras.src.saving
import saving_lib`, ...) and looks each up in the installed version: a call on a code path that no
fast test runs (a CLI option, an error branch, the distributed step) fails here at a floor that lacks
it, instead of on a user's machine. The behaviours the code relies on, not only names, follow.
"""

import ast
import glob
import importlib
import os
import re

import pytest

from conftest import ROOT

DEPENDENCIES = ("keras", "tensorflow", "numpy", "PIL", "imageio", "tqdm")  # import names of requirements.txt's packages


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


def source_files():
    files = glob.glob(os.path.join(ROOT, "vq_vae_keras", "**", "*.py"), recursive=True)
    return sorted(files + [os.path.join(ROOT, name) for name in ("train.py", "sample.py")])


def imported_names(tree):
    """{local name: dotted path} for the file's imports from the dependencies, wherever they are
    (functions import some lazily)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in DEPENDENCIES:
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in DEPENDENCIES:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def dotted_names(tree, imported):
    """Every dotted path the file reaches through an imported name: `ops.mean` -> keras.ops.mean."""
    found = set(imported.values())
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if parts and isinstance(node, ast.Name) and node.id in imported:
            found.add(".".join([imported[node.id], *reversed(parts)]))
    return found


def resolve(path):
    """The object a dotted path names, attribute by attribute from the top package as the code
    reaches it (`tf.distribute` is TensorFlow's API module, not the package folder of that name);
    a submodule no attribute leads to (imageio.v3, keras.src.saving) is imported."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def test_every_api_the_package_names_exists():
    checked, missing = set(), []
    for path in source_files():
        tree = ast.parse(open(path).read(), path)
        for name in sorted(dotted_names(tree, imported_names(tree))):
            checked.add(name)
            try:
                resolve(name)
            except (ImportError, AttributeError):
                missing.append(f"{os.path.relpath(path, ROOT)}: {name}")
    assert len(checked) > 150  # the scan saw the package (about 230 names)
    import keras
    import tensorflow as tf
    assert not missing, f"not in keras {keras.__version__} / tensorflow {tf.__version__}: {missing}"


def test_optimizer_slots_are_named_after_the_variable_path():
    """io.py's checkpoints name each optimizer slot by its variable's path."""
    import keras
    layer = keras.layers.Dense(2, name="probe_dense")
    layer.build((None, 3))
    optimizer = keras.optimizers.Adam()
    optimizer.build(layer.trainable_variables)
    assert any(v.name == "probe_dense_kernel_momentum" for v in optimizer.variables)


def test_keras_3_batchnorm_can_synchronize():
    """models.py's --sync-batchnorm, and Keras 3 itself (TensorFlow < 2.16 installs Keras 2)."""
    import inspect

    import keras
    import tensorflow as tf
    assert version(keras.__version__) >= (3,) and version(tf.__version__) >= (2, 16)
    assert "synchronized" in inspect.signature(keras.layers.BatchNormalization).parameters


def test_every_requirement_has_a_floor_and_a_cap():
    lines = [line.strip() for line in open(os.path.join(ROOT, "requirements.txt")) if line.strip()
             and not line.startswith("#")]
    assert len(lines) == len(floors()) == 7
    assert all("<" in line for line in lines), "every dependency needs an upper bound too"


def test_installed_versions_are_within_the_floors():
    import importlib.metadata as metadata
    for package, floor in floors().items():
        assert version(metadata.version(package)) >= version(floor), package
