"""The commands behind the CLI: train, eval and generate.

Order matters for bad input: everything that can be wrong (config, backend,
data, checkpoint) is checked before the first byte is written to the run
directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from dist_rnn.config import (Config, changed_keys, check_divisible, load_config,
                             model_defining_differences, save_config)
from dist_rnn.errors import UserError
from dist_rnn.run_dir import RunDirectory
from dist_rnn.runtime import import_tensorflow

log = logging.getLogger("dist_rnn")


def resolve_train_config(config_paths: list[str], overrides: list[str],
                         run_dir: str | None) -> tuple[Config, RunDirectory, list[str]]:
    """Works out the config and run directory of ``dist-rnn train``.

    A run directory that already holds ``config.yaml`` is resumed: its saved
    config is the base, the given files and overrides are merged on top, and
    changes to the model or vocabulary are refused. A new run starts from the
    defaults, the files and the overrides.

    Returns:
        The config, the run directory and the list of changed keys on resume.

    Raises:
        UserError: On bad config, a missing run directory for a bare resume,
            or a model-defining change on resume.
    """
    if run_dir is None:
        if not config_paths:
            raise UserError("train needs a CONFIG file or --run-dir of a run to resume")
        run_dir = str(Path("runs") / Path(config_paths[-1]).stem)
    rd = RunDirectory(run_dir)
    if rd.has_config():
        saved = rd.load_config()
        config = load_config(config_paths, overrides, base=saved.to_dict())
        diffs = model_defining_differences(saved, config)
        if diffs:
            raise UserError(f"cannot resume {rd.path} with a different model or vocabulary: " + "; ".join(diffs)
                            + " (use a new --run-dir)")
        return config, rd, changed_keys(saved, config)
    if not config_paths and not overrides:
        # A bare --run-dir means "resume": a typo must not start a new run.
        raise UserError(f"{rd.path} is not a dist-rnn run directory (no config.yaml); pass a CONFIG file to start one")
    return load_config(config_paths, overrides), rd, []


def _setup_tensorflow(config: Config, precision: str | None = None) -> None:
    import keras
    import tensorflow as tf

    from dist_rnn.trainer import set_precision

    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.train.seed)
    set_precision(precision or config.train.precision)


def train(config_paths: list[str], overrides: list[str], run_dir: str | None) -> dict:
    """``dist-rnn train``: trains a new run or resumes one.

    Returns:
        The final step, epoch and validation result.
    """
    config, rd, changes = resolve_train_config(config_paths, overrides, run_dir)
    import_tensorflow()
    from dist_rnn.dataset import encode_corpus
    from dist_rnn.distribution import create_backend
    from dist_rnn.summaries import MetricsLogger, setup_logging
    from dist_rnn.trainer import Trainer

    backend = create_backend(config.distribute)
    setup_logging(backend.is_chief)
    check_divisible(config, backend.num_replicas)
    _setup_tensorflow(config)
    corpus = encode_corpus(config.data, rd.load_vocab())
    trainer = Trainer(config, rd, backend, corpus)
    restored = trainer.restore()
    # From here on the run directory is written (chief only).
    if backend.is_chief:
        rd.ensure()
        save_config(config, rd.config_file)
        corpus.vocab.save(rd.vocab_file)
        rd.kernels_file.write_text("\n".join(k.line() for k in trainer.kernels) + "\n", encoding="utf-8")
        setup_logging(True, rd.log_file)
    for line in trainer.summary_lines():
        log.info(line)
    if restored:
        log.info(f"resumed from {restored} (step {int(trainer.state.step)})")
        for change in changes:
            log.info(f"config change on resume: {change}")
    metrics = MetricsLogger(rd.path, backend.is_chief, config.logging.tensorboard, config.logging.progress,
                            config.data.level)
    metrics.text("train", "config", "```\n" + config.to_yaml() + "```", int(trainer.state.step))
    metrics.text("train", "kernels", "\n".join("    " + k.line() for k in trainer.kernels), int(trainer.state.step))
    metrics.hparams(hparams_of(config, backend.num_replicas), rd.path.name)
    try:
        result = trainer.train(metrics)
        # A stopped run (preemption) exits at once: its grace period is for the checkpoint.
        if backend.is_chief and config.train.sample_length and not result.get("stopped_by"):
            sample = trainer.sample(config.train.sample_prime, config.train.sample_length, seed=0)
            log.info("sample:\n" + sample)
    finally:
        metrics.close()
    return result


def hparams_of(config: Config, num_replicas: int) -> dict:
    """The hyperparameters shown in TensorBoard's HParams table."""
    m, o, t = config.model, config.optimizer, config.train
    return {"cell": m.cell, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "embedding_size": m.embedding_size, "dropout": m.dropout, "optimizer": o.name,
            "learning_rate": o.learning_rate, "schedule": o.schedule.name, "clip_norm": o.clip_norm,
            "batch_size": t.batch_size, "num_steps": t.num_steps, "precision": t.precision,
            "backend": config.distribute.backend, "replicas": num_replicas, "corpus": config.data.corpus,
            "level": config.data.level}


def evaluate(run_dir: str, split: str) -> dict:
    """``dist-rnn eval``: loss and perplexity of the latest checkpoint on a split (one device)."""
    rd = RunDirectory(run_dir)
    config = rd.load_config()
    config.distribute.backend, config.distribute.cpu_devices = "none", 0
    vocab = rd.load_vocab()
    if vocab is None:
        raise UserError(f"{rd.path} has no vocab.json")
    import_tensorflow()
    from dist_rnn.dataset import encode_corpus
    from dist_rnn.distribution import create_backend
    from dist_rnn.summaries import setup_logging
    from dist_rnn.trainer import Trainer

    setup_logging(True)
    _setup_tensorflow(config, precision="float32")
    trainer = Trainer(config, rd, create_backend(config.distribute), encode_corpus(config.data, vocab))
    if trainer.restore() is None:
        raise UserError(f"{rd.checkpoints} holds no checkpoint")
    result = trainer.evaluate(split).as_dict()
    result["step"] = int(trainer.state.step)
    return result


def load_model_for_inference(run_dir: str, allow_cudnn: bool = True):
    """Builds the model of a run and restores its latest weights (float32, one device).

    Args:
        run_dir: The training run.
        allow_cudnn: False keeps ``lstm``/``gru`` off cuDNN even on a GPU (for a portable export).

    Returns:
        ``(model, vocab, config, checkpoint_path)``.
    """
    rd = RunDirectory(run_dir)
    config = rd.load_config()
    vocab = rd.load_vocab()
    if vocab is None:
        raise UserError(f"{rd.path} has no vocab.json")
    tf = import_tensorflow()

    from dist_rnn.model import build_model

    _setup_tensorflow(config, precision="float32")
    if config.model.cudnn == "require":
        # Same weights; sampling and export must also work where cuDNN cannot run.
        config.model.cudnn = "auto"
    model = build_model(config.model, len(vocab), config.train.seed, allow_cudnn=allow_cudnn)
    path = tf.train.latest_checkpoint(str(rd.checkpoints))
    if path is None:
        raise UserError(f"{rd.checkpoints} holds no checkpoint")
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be restored: {str(e).splitlines()[0][:300]}") from None
    return model, vocab, config, path


def generate(run_dir: str, prime: str, length: int, temperature: float, top_k: int, top_p: float,
             seed: int, num_samples: int, stream=None, model_dir: str | None = None) -> list[str]:
    """``dist-rnn generate``: samples from the latest checkpoint, streaming to ``stream``.

    With ``model_dir`` (instead of ``run_dir``) it samples from a folder written
    by ``dist-rnn export``, loaded as a SavedModel without the model code.

    Returns:
        The generated continuations (prime excluded).
    """
    import_tensorflow()
    from dist_rnn.generation import Sampler, check_sampling_args, model_step_fn

    stream = stream if stream is not None else sys.stdout
    check_sampling_args(temperature, top_k, top_p, length, num_samples)
    if (run_dir is None) == (model_dir is None):
        raise UserError("generate needs exactly one of --run-dir (a training run) and --model (an export)")
    if model_dir is not None:
        from dist_rnn.export import ExportedModel

        exported = ExportedModel(model_dir)
        sampler, vocab = exported.sampler(), exported.vocab
    else:
        model, vocab, _, _ = load_model_for_inference(run_dir)
        sampler = Sampler(model_step_fn(model), vocab)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    on_tokens = None
    if num_samples == 1:
        stream.write(prime)
        on_tokens = _streamer(stream, vocab.level, prime)
    ids = sampler.generate(prime, length, temperature, top_k, top_p, seed, num_samples, on_tokens, warn)
    texts = [vocab.decode(row) for row in ids]
    if num_samples == 1:
        stream.write("\n")
    else:
        for i, text in enumerate(texts):
            stream.write(f"--- sample {i} ---\n{prime}{text}\n")
    stream.flush()
    return texts


def export(run_dir: str, out_dir: str) -> dict:
    """``dist-rnn export``: writes a run's latest checkpoint as a SavedModel, a ``.keras`` file and the vocabulary.

    Returns:
        The export description (``export.json``) and its path.
    """
    import_tensorflow()
    from dist_rnn.export import export_run

    return export_run(run_dir, out_dir)


def _streamer(stream, level: str, prime: str):
    state = {"at_line_start": prime == "" or prime.endswith("\n")}

    def on_tokens(tokens: list[str]) -> None:
        token = tokens[0]
        if level == "char":
            stream.write("\ufffd" if token == "<unk>" else token)
        elif token == "<eos>":
            stream.write("\n")
            state["at_line_start"] = True
        else:
            stream.write(token if state["at_line_start"] else " " + token)
            state["at_line_start"] = False
        stream.flush()

    return on_tokens


def print_json_line(result: dict) -> None:
    """Prints a result as the last line of stdout (one JSON object)."""
    print(json.dumps(result))
