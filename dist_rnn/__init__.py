"""dist-rnn: recurrent language models trained on one device or many, from one YAML config.

The public API, importable from ``dist_rnn`` (each name loads its module on
first use, so ``import dist_rnn`` and the CLI start without TensorFlow):

* Config: :func:`load_config` (defaults, YAML files and ``KEY=VALUE``
  overrides, validated) and :class:`Config`.
* Training: :func:`build_trainer` (model, optimizer, checkpoints and backend
  assembled into a ready Trainer).
* Distribution: :func:`create_backend` (``none``, ``mirrored``,
  ``multi_worker``, ``horovod``).
* Model: :func:`build_model`, :class:`LanguageModel` and
  :data:`RECURRENT_LAYERS` (``model.cell`` name to its Keras layer class).
* Inference: :func:`load_model_for_inference` (a run's model and vocabulary
  from one of its checkpoints), :func:`export_run` and :class:`ExportedModel`
  (a SavedModel export and its loader), :class:`Sampler` (temperature,
  top-k, top-p sampling).

Package layout, bottom to top (nothing imports upward):

* :mod:`dist_rnn.data`: corpora, vocabularies, encoding, batching.
* :mod:`dist_rnn.models`: the language model and its recurrent layers.
* :mod:`dist_rnn.training`: the training loop and its parts (steps,
  gradients, optimizers, schedules, checkpoints, preemption).
* top level: ``config`` (keys, loading, validation), ``errors``,
  ``runtime`` (process and TensorFlow setup), ``run_dir``, ``summaries``,
  ``distribution`` (backends), ``generation``, ``inference`` (loading a run),
  ``export``, ``report``, and the command line: ``app`` (the commands) and
  ``cli`` (argument parsing).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
PUBLIC_API = {
    "load_config": "dist_rnn.config",
    "Config": "dist_rnn.config",
    "build_trainer": "dist_rnn.training.factory",
    "create_backend": "dist_rnn.distribution",
    "build_model": "dist_rnn.models.model",
    "LanguageModel": "dist_rnn.models.model",
    "RECURRENT_LAYERS": "dist_rnn.models.layers",
    "load_model_for_inference": "dist_rnn.inference",
    "export_run": "dist_rnn.export",
    "ExportedModel": "dist_rnn.export",
    "Sampler": "dist_rnn.generation",
}

__all__ = ["__version__", *PUBLIC_API]


def __getattr__(name: str):
    """Imports the module of a public name on first access (PEP 562)."""
    module = PUBLIC_API.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_rnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_API))
