"""vq_vae_keras: Su Jianlin's VQ-VAE with its attention prior, for Keras 3 on TensorFlow."""

import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.9.0"  # the one place: pyproject.toml reads it


def _import_tensorflow_quietly():
    """TensorFlow prints start-up notices (oneDNN, CUDA) from C++ before any setting can stop them;
    hide the C-level stderr just while it is imported. Python errors still surface, and the
    user's TF_CPP_MIN_LOG_LEVEL (set or not) is restored afterwards. Set VQK_VERBOSE_TF=1 to see everything."""
    if "tensorflow" in sys.modules or os.environ.get("VQK_VERBOSE_TF"):
        return
    user_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        saved = devnull = None
    if saved is not None:
        os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        # The quiet level is for the import only: later C++ errors must reach the user.
        if user_level is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = user_level


# Each public name and the module that defines it. They are imported on first use (PEP 562), so
# that `import vq_vae_keras`, `Config` and the commands' --help do not import TensorFlow; the first
# name that needs TensorFlow imports all of them, as importing the package did before.
_LIGHT = {"Config": "config", "UsageError": "errors"}
_HEAVY = {
    "load_images": "data", "evaluate": "evaluation", "EvaluateEvery": "evaluation",
    "VQVAE": "models", "VQVAEObjective": "models", "build_vqvae": "models",
    "CausalSelfAttention": "priors.attention", "GridPositionEmbedding": "priors.attention", "build_prior": "priors",
    "GatedLayer": "priors.pixelcnn", "PixelCNN": "priors.pixelcnn", "sample_codes": "priors.sampling",
    "sample_levels": "priors.sampling",
    "FiniteScalarQuantizer": "quantizers", "GumbelQuantizer": "quantizers", "RotationTrick": "quantizers",
    "StraightThrough": "quantizers", "VectorQuantizer": "quantizers",
    "load_run": "run", "train_prior": "training", "train_vqvae": "training",
    "make_strategy": "distribute", "callbacks": None,  # None: the name is a module of the package
}

__all__ = ["Config", "UsageError", "VectorQuantizer", "StraightThrough", "GridPositionEmbedding",
           "CausalSelfAttention", "VQVAE", "build_vqvae", "build_prior", "load_run", "sample_codes",
           "load_images", "train_vqvae", "train_prior", "callbacks", "VQVAEObjective", "GumbelQuantizer",
           "evaluate", "EvaluateEvery", "PixelCNN", "GatedLayer", "make_strategy", "FiniteScalarQuantizer",
           "RotationTrick", "sample_levels"]


def _load(name, module):
    value = importlib.import_module(f"{__name__}.{module or name}")
    globals()[name] = value if module is None else getattr(value, name)


def _load_all():
    """Import every module that needs TensorFlow (quietly) and bind its public names. Loading them
    all at once also registers every Keras layer of the package, which `keras.saving.load_model`
    needs to read a .keras file."""
    _import_tensorflow_quietly()
    for name, module in _HEAVY.items():
        _load(name, module)


def __getattr__(name):
    if name in _LIGHT:
        _load(name, _LIGHT[name])
    elif name in _HEAVY:
        _load_all()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _package_initializing():
    """Whether a module of this package is being imported right now (it may be what imports Keras)."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items()) if name.startswith(f"{__name__}."))


class _AfterKeras(importlib.abc.MetaPathFinder):
    """`import vq_vae_keras` then `keras.saving.load_model("RUN/vqvae.keras")` must find the
    package's layers, which register themselves with Keras when their modules are imported. The
    package no longer imports them itself, so they are imported right after Keras is: this finder
    wraps Keras's own loader once. (When a module of the package is what imports Keras, the modules
    it needs come with it, and importing the others in the middle of it could meet a half-imported
    module: they wait for their first use then.)"""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
            _import_tensorflow_quietly()  # Keras would import it anyway, with its notices
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_keras = spec.loader.exec_module

            def exec_module(module):
                run_keras(module)
                if not _package_initializing():
                    _load_all()

            spec.loader.exec_module = exec_module
        return spec


if "keras" in sys.modules:
    _load_all()
elif not any(isinstance(finder, _AfterKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterKeras())
