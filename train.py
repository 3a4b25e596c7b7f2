"""Train a VQ-VAE and its prior: `python train.py --help`. The command is
vq_vae_keras/commands/train.py (installed: `vqk-train`); this file runs it from the repository."""

from vq_vae_keras.commands.train import build_parser, main, run  # noqa: F401  (build_parser, main: for tests)

if __name__ == "__main__":
    run()
