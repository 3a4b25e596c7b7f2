"""The command-line programs: `train` (vqk-train, train.py) and `sample` (vqk-sample, sample.py).

Each parses and checks its arguments before it imports TensorFlow, so `--help` and a bad flag
answer at once. `python -m vq_vae_keras.commands.train` runs one without the console scripts.
"""
