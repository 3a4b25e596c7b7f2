"""Pictures and scores from a trained run: `python sample.py --help`. The command is
vq_vae_keras/commands/sample.py (installed: `vqk-sample`); this file runs it from the repository."""

from vq_vae_keras.commands.sample import build_parser, main, run  # noqa: F401  (build_parser, main: for tests)

if __name__ == "__main__":
    run()
