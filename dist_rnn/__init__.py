"""dist-rnn: recurrent language models trained on one device or many, from one YAML config."""

__version__ = "0.1.0"
