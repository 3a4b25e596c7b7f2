"""vq_vae_keras: Su Jianlin's VQ-VAE with its attention prior, for Keras 3 on TensorFlow."""

import os
import sys


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


_import_tensorflow_quietly()

from .config import Config  # noqa: E402
from .data import load_images  # noqa: E402
from .errors import UsageError  # noqa: E402
from .evaluation import EvaluateEvery, evaluate  # noqa: E402
from .models import VQVAE, VQVAEObjective, build_vqvae  # noqa: E402
from .prior import CausalSelfAttention, GridPositionEmbedding, build_prior  # noqa: E402
from .pixelcnn import GatedLayer, PixelCNN  # noqa: E402
from .quantizers import FiniteScalarQuantizer, GumbelQuantizer, RotationTrick, StraightThrough, VectorQuantizer  # noqa: E402
from .run import load_run  # noqa: E402
from .sampling import sample_codes  # noqa: E402
from .training import train_prior, train_vqvae  # noqa: E402
from .distribute import make_strategy  # noqa: E402
from . import callbacks  # noqa: E402

__all__ = ["Config", "UsageError", "VectorQuantizer", "StraightThrough", "GridPositionEmbedding",
           "CausalSelfAttention", "VQVAE", "build_vqvae", "build_prior", "load_run", "sample_codes",
           "load_images", "train_vqvae", "train_prior", "callbacks", "VQVAEObjective", "GumbelQuantizer",
           "evaluate", "EvaluateEvery", "PixelCNN", "GatedLayer", "make_strategy", "FiniteScalarQuantizer",
           "RotationTrick"]
