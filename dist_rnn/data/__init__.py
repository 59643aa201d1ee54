"""Text in, token streams out: corpora, vocabularies, encoding and batching.

Nothing here imports from :mod:`dist_rnn.training` or the command-line layer.
"""
