"""Text in, token streams out: corpora, vocabularies, encoding, prepared token files and batching.

Nothing here imports from :mod:`dist_rnn.training` or the command-line layer.
:func:`load_corpus` is the one entry point to a run's data.
"""

from dist_rnn.data.prepared import PreparedCorpus, load_corpus

__all__ = ["PreparedCorpus", "load_corpus"]
