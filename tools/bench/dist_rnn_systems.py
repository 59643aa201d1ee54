"""The dist-rnn rows: ``loop`` (``Trainer.train`` unchanged) and ``step`` (``StepFunctions.train_step`` alone).

Both build a real dist-rnn Trainer on synthetic char-level text, from a config
made of the row's sizes (``dist_rnn_config``); ``assemble_trainer`` is the one
place here that puts a Trainer together.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.protocol import Commands, Quit, emit, peak_rss_mib, serve
from bench.tf_support import tf_memory, tf_profile, tf_setup
from bench.workload import synthetic_text, window_timer, windows


def dist_rnn_config(spec: dict, data_path: Path, max_steps: int):
    """The dist-rnn ``Config`` of a row: its sizes, Adam, no dropout, no evaluation, checkpoints or progress bar."""
    from dist_rnn.config import config_from_dict

    gpu = spec.get("gpu", False)
    mirrored = spec["backend"] == "mirrored"
    return config_from_dict({
        "data": {"corpus": "file", "path": str(data_path), "split": [1.0, 0.0, 0.0], "level": "char"},
        "model": {"cell": spec["cell"], "num_layers": spec["layers"], "hidden_size": spec["hidden"],
                  "embedding_size": spec["embedding"], "dropout": 0.0},
        "optimizer": {"name": "adam", "learning_rate": 0.002, "clip_norm": spec["clip"]},
        "train": {"batch_size": spec["batch"], "num_steps": spec["bptt"], "max_steps": max_steps,
                  "max_epochs": None, "log_every": spec["steps"], "eval_every": 0, "sample_length": 0,
                  "precision": spec["precision"], "jit_compile": spec["jit"], "seed": 0},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "distribute": {"backend": spec["backend"], "cpu_devices": spec["replicas"] if mirrored and not gpu else 0},
        "logging": {"progress": "off"},
    })


def assemble_trainer(config, run_path: Path, metrics_type=None):
    """A dist-rnn Trainer for ``config``, as the CLI assembles one, with its run directory at ``run_path``.

    ``metrics_type`` (a MetricsLogger class) makes the trainer's metrics logger, as ``dist-rnn train`` does.

    Creates the backend (and the logical CPU devices of a mirrored backend, so it
    must run before TensorFlow initializes), seeds, sets the precision policy,
    encodes the corpus and restores the run directory's latest checkpoint, if any.
    """
    import keras

    from dist_rnn.config import check_divisible
    from dist_rnn.data.encoding import encode_corpus
    from dist_rnn.distribution import create_backend
    from dist_rnn.run_dir import RunDirectory
    from dist_rnn.runtime import set_precision
    from dist_rnn.training.factory import build_trainer

    backend = create_backend(config.distribute)
    check_divisible(config, backend.num_replicas)
    keras.utils.set_random_seed(config.train.seed)
    set_precision(config.train.precision)
    corpus = encode_corpus(config.data)
    run_dir = RunDirectory(run_path)
    run_dir.ensure()
    metrics = (metrics_type(run_dir, True, tensorboard=config.logging.tensorboard, progress="off", level="char")
               if metrics_type else None)
    trainer = build_trainer(config, run_dir, backend=backend, corpus=corpus, metrics=metrics)
    trainer.restore()
    return trainer


def _row_trainer(spec: dict, workdir: Path, max_steps: int, metrics_type=None):
    """The row's ``(config, trainer, info)``: synthetic text in ``workdir``, thread settings, the Trainer."""
    data_path = workdir / "synthetic.txt"
    data_path.write_text(synthetic_text(spec), encoding="utf-8")
    config = dist_rnn_config(spec, data_path, max_steps)
    tf_setup(spec)
    trainer = assemble_trainer(config, workdir / "run", metrics_type)
    backend = trainer.backend
    info = {"vocab": len(trainer.corpus.vocab), "replicas": backend.num_replicas, "devices": backend.devices,
            "parameters": trainer.parameter_count, "kernels": [k.line() for k in trainer.kernels]}
    return config, trainer, info


def work_loop(spec: dict, workdir: Path) -> None:
    """The real training loop, timed between log points (every ``steps`` steps).

    ``Trainer.train`` runs with ``log_every = steps``; a MetricsLogger subclass
    notes the time at the end of each log point (so each interval holds
    ``steps`` full loop iterations and one log point's writing) and, at each
    log point, waits for the parent's next command before the loop goes on.
    Nothing in the trainer is changed or hooked.
    """
    from dist_rnn.summaries import MetricsLogger

    class TimedMetrics(MetricsLogger):
        started = None
        log_points = 0

        def train(self, step, values):
            super().train(step, values)
            now = time.perf_counter()
            self.log_points += 1
            if self.started is not None:
                emit("result", seconds=now - self.started, steps=spec["steps"],
                     trainer_tokens_per_sec=values.get("tokens_per_sec"), loss=values.get("loss"))
            elif self.log_points < spec["warmup"]:
                return
            else:
                emit("ready", warmup_s=now - t_build, info=info)
            commands.next()
            self.started = time.perf_counter()

    base_rss = peak_rss_mib()
    max_steps = (spec["warmup"] + spec["repeats"] + 2) * spec["steps"]
    config, trainer, info = _row_trainer(spec, workdir, max_steps, TimedMetrics)
    commands = Commands(lambda: tf_memory(base_rss))
    t_build = time.perf_counter()
    try:
        trainer.train()
    except Quit:
        return
    finally:
        trainer.metrics.close()
    raise RuntimeError("the training loop ended before the parent was done timing")


def work_step(spec: dict, workdir: Path) -> None:
    """``StepFunctions.train_step`` of the same Trainer, driven directly on fixed windows."""
    base_rss = peak_rss_mib()
    _, trainer, info = _row_trainer(spec, workdir, 10)
    import tensorflow as tf

    backend = trainer.backend
    fixed = [backend.shard((tf.constant(x), tf.constant(y))) for x, y in windows(spec)]
    states = backend.shard(trainer.model.initial_state(spec["batch"]))
    seed = tf.constant([0, 0], tf.int64)
    trainer.optimizer.learning_rate.assign(0.002)
    run = window_timer(fixed, states, lambda x, y, s: trainer.steps.train_step(x, y, s, seed)[:2])

    serve(spec, run, lambda: tf_memory(base_rss), info, lambda run, n: tf_profile(run, n, workdir))
