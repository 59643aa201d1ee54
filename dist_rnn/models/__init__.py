"""The language model and its recurrent layers.

Nothing here imports from :mod:`dist_rnn.training` or the command-line layer.
"""
