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

from dist_rnn.config import (EPOCH_INVARIANT_KEYS, RESUME_INVARIANT_KEYS, Config,
                             changed_keys, check_divisible, load_config, resume_invariant_differences,
                             save_config)
from dist_rnn.errors import UserError
from dist_rnn.run_dir import RunDirectory
from dist_rnn.inference import inference_config, load_model_for_inference
from dist_rnn.runtime import import_tensorflow, setup_tensorflow

log = logging.getLogger("dist_rnn")


def resolve_train_config(config_paths: list[str], overrides: list[str],
                         run_dir: str | None) -> tuple[Config, RunDirectory, Config | None]:
    """Works out the config and run directory of ``dist-rnn train``.

    A run directory that already holds ``config.yaml`` is resumed: its saved
    config is the base, the given files and overrides are merged on top, and
    changes to :data:`~dist_rnn.config.RESUME_INVARIANT_KEYS` are refused. A
    new run starts from the defaults, the files and the overrides.

    Returns:
        The config, the run directory and, on resume, the saved config.

    Raises:
        UserError: On bad config, a missing run directory for a bare resume,
            or a change of a resume-invariant key on resume.
    """
    if run_dir is None:
        if not config_paths:
            raise UserError("train needs a CONFIG file or --run-dir of a run to resume")
        run_dir = str(Path("runs") / Path(config_paths[-1]).stem)
    rd = RunDirectory(run_dir)
    if rd.has_config():
        saved = rd.load_config()
        config = load_config(config_paths, overrides, base=saved.to_dict())
        diffs = resume_invariant_differences(saved, config)
        if diffs:
            raise UserError(f"cannot resume {rd.path} with " + "; ".join(diffs) + " (a resume may not change "
                            + ", ".join(RESUME_INVARIANT_KEYS) + "; use a new --run-dir)")
        return config, rd, saved
    if not config_paths and not overrides:
        # A bare --run-dir means "resume": a typo must not start a new run.
        raise UserError(f"{rd.path} is not a dist-rnn run directory (no config.yaml); pass a CONFIG file to start one")
    return load_config(config_paths, overrides), rd, None


def check_same_data(rd: RunDirectory, config: Config, corpus, action: str) -> None:
    """Refuses data whose text differs from the data the run was trained on, wherever it is read from.

    The prepared tokenizer must equal the run's (``vocab.json``, by :attr:`Tokenizer.identity`).
    The run's ``data.json`` holds the identity of its prepared tokens
    (:attr:`~dist_rnn.data.prepared.PreparedCorpus.data_sha256`); a record
    written before prepared corpora (the SHA-256 of the splits' text) is
    checked by its token counts, a run without ``data.json`` by its
    vocabulary alone.

    Args:
        rd: The run directory.
        config: The config the data was read with.
        corpus: The :class:`~dist_rnn.data.prepared.PreparedCorpus` read now.
        action: ``resume`` or ``evaluate``, for the message.

    Raises:
        UserError: If the data differs.
    """
    source = _data_source(config)
    hint = f"point {source[0]} at the run's data" + (" or use a new --run-dir" if action == "resume" else "")
    record = _read_data_record(rd)
    if record is not None and record.get("identity") != "prepared":  # written before prepared corpora
        counts = {"train": len(corpus.train), "valid": len(corpus.valid), "test": len(corpus.test)}
        if record.get("tokens") != counts:
            raise UserError(f"cannot {action} {rd.path}: the data read from {source[0]} {source[1]} is not the data "
                            f"this run was trained on (tokens {counts} != {record.get('tokens')} in "
                            f"{rd.data_file}); {hint}")
    elif record is not None and record.get("sha256") != corpus.data_sha256:
        raise UserError(f"cannot {action} {rd.path}: the data read from {source[0]} {source[1]} is not the data "
                        f"this run was trained on (SHA-256 {corpus.data_sha256[:12]}... != "
                        f"{str(record.get('sha256'))[:12]}... in {rd.data_file}); {hint}")
    saved = rd.load_tokenizer()
    if saved is not None and (saved.kind, saved.identity) != (corpus.tokenizer.kind, corpus.tokenizer.identity):
        raise UserError(f"cannot {action} {rd.path}: the data read from {source[0]} {source[1]} gives another "
                        f"vocabulary than {rd.vocab_file}; {hint}")


def write_data_record(rd: RunDirectory, corpus) -> None:
    """Writes ``RUN_DIR/data.json``: the identity and token counts of the prepared data the run trains on."""
    record = {"sha256": corpus.data_sha256, "identity": "prepared",
              "tokens": {"train": len(corpus.train), "valid": len(corpus.valid), "test": len(corpus.test)}}
    rd.data_file.write_text(json.dumps(record) + "\n", encoding="utf-8")


def _read_data_record(rd: RunDirectory) -> dict | None:
    if not rd.data_file.is_file():
        return None
    try:
        record = json.loads(rd.data_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{rd.data_file}: not a dist-rnn data record (delete it to skip the data check)") from None
    if not isinstance(record, dict):
        raise UserError(f"{rd.data_file}: not a dist-rnn data record (delete it to skip the data check)")
    return record


def _data_source(config: Config) -> tuple[str, str]:
    """``(key, value)`` saying where the data is read from, for messages."""
    d = config.data
    if d.train_file:
        return "data.train_file", d.train_file
    if d.path:
        return "data.path", str(d.path)
    return "data.corpus", d.corpus


def check_epoch_invariant_keys(saved: Config, config: Config, epoch: int, index: int, rd: RunDirectory) -> None:
    """Refuses a change of ``train.seed``/``data.random_offset`` on a resume in the middle of an epoch.

    With ``data.random_offset`` the two keys decide where an epoch's windows
    start; changed mid-epoch, the remaining windows would shift under the
    carried state. At an epoch boundary (``index`` 0) they may change, and
    apply from that epoch on.

    ``train.variable_length`` may change only at an epoch boundary too: the
    fixed-length and variable-length walks through an epoch stand at
    different tokens after the same number of batches.

    Raises:
        UserError: Naming the changed keys and the position.
    """
    if index and saved.train.variable_length != config.train.variable_length:
        raise UserError(f"cannot resume {rd.path} in the middle of epoch {epoch} (after its batch {index}) with "
                        f"train.variable_length: {saved.train.variable_length} -> {config.train.variable_length}: "
                        "the rest of the epoch's windows would not continue where its last one ended; resume "
                        "without the change (it may change once a run stops at an epoch's end) or use a new --run-dir")
    if index == 0 or not (saved.data.random_offset or config.data.random_offset):
        return
    diffs = [c for c in changed_keys(saved, config) if c.split(":", 1)[0] in EPOCH_INVARIANT_KEYS]
    if diffs:
        raise UserError(f"cannot resume {rd.path} in the middle of epoch {epoch} (after its batch {index}) with "
                        + "; ".join(diffs) + ": with data.random_offset the windows of the epoch would shift under "
                        "the carried state; resume without the change (it may change once a run stops at an "
                        "epoch's end, e.g. by train.max_epochs) or use a new --run-dir")


def train(config_paths: list[str], overrides: list[str], run_dir: str | None) -> dict:
    """``dist-rnn train``: trains a new run or resumes one.

    Returns:
        The final step, epoch and validation result.
    """
    config, rd, saved = resolve_train_config(config_paths, overrides, run_dir)
    changes = changed_keys(saved, config) if saved is not None else []
    import_tensorflow()
    from dist_rnn.data import load_corpus
    from dist_rnn.data.agreement import check_workers_agree
    from dist_rnn.distribution import create_backend
    from dist_rnn.rewind import rewind_run_output
    from dist_rnn.summaries import MetricsLogger, setup_logging
    from dist_rnn.training.factory import build_trainer

    backend = create_backend(config.distribute)
    setup_logging(backend.is_chief)
    check_divisible(config, backend.num_replicas)
    setup_tensorflow(config)
    corpus = load_corpus(config.data)
    check_workers_agree(backend, corpus)
    if saved is not None:
        check_same_data(rd, config, corpus, "resume")
    metrics = MetricsLogger.for_run(config, rd, backend.is_chief)  # writes nothing until the first record
    trainer = build_trainer(config, rd, backend=backend, corpus=corpus, metrics=metrics)
    restored = trainer.restore()
    if saved is not None and restored:
        check_epoch_invariant_keys(saved, config, int(trainer.state.epoch), int(trainer.state.batch_in_epoch), rd)
    # From here on the run directory is written (chief only).
    if backend.is_chief:
        rd.ensure()
        # Steps after the resumed checkpoint (logged by a job that then lost a worker) are trained again.
        rewind_run_output(rd.path, int(trainer.state.step))
        save_config(config, rd.config_file)
        rd.save_tokenizer(corpus.tokenizer)
        write_data_record(rd, corpus)
        rd.kernels_file.write_text("\n".join(k.line() for k in trainer.kernels) + "\n", encoding="utf-8")
        setup_logging(True, rd.log_file)
    for line in trainer.summary_lines():
        log.info(line)
    if restored:
        log.info(f"resumed from {restored} (step {int(trainer.state.step)})")
        for change in changes:
            log.info(f"config change on resume: {change}")
    metrics.text("train", "config", "```\n" + config.to_yaml() + "```", int(trainer.state.step))
    metrics.text("train", "kernels", "\n".join("    " + k.line() for k in trainer.kernels), int(trainer.state.step))
    metrics.hparams(hparams_of(config, backend.num_replicas), rd.path.name)
    try:
        result = trainer.train()
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


def evaluate(run_dir: str, split: str, checkpoint: str = "latest", overrides: list[str] = (),
             dynamic=None) -> dict:
    """``dist-rnn eval``: loss and perplexity of a checkpoint of a run on a split (one device).

    Args:
        run_dir: The training run.
        split: ``valid`` or ``test``.
        checkpoint: ``latest``, ``best`` or a checkpoint path (see
            :func:`~dist_rnn.training.checkpoints.find_checkpoint`).
        overrides: ``--set`` of :data:`~dist_rnn.config.DATA_LOCATION_KEYS`
            only, for data that moved; the text must be the run's.
        dynamic: :class:`~dist_rnn.training.dynamic_settings.DynamicSettings` for dynamic evaluation
            (:mod:`dist_rnn.training.dynamic_eval`), or None for static evaluation.

    Returns:
        ``split``, ``loss``, ``perplexity``, ``tokens`` (``bpc``; ``bpb``: bits per source byte), ``step`` and
        ``checkpoint``; with ``dynamic``, also ``static_loss`` and ``dynamic`` (the settings used).
    """
    rd = RunDirectory(run_dir)
    config = inference_config(rd, overrides, "eval")
    config.distribute.backend, config.distribute.cpu_devices = "none", 0
    tokenizer = rd.load_tokenizer()
    if tokenizer is None:
        raise UserError(f"{rd.path} has no vocab.json")
    import_tensorflow()
    from dist_rnn.training.checkpoints import accepted_fingerprints, check_fingerprint, find_checkpoint
    from dist_rnn.data import load_corpus
    from dist_rnn.distribution import create_backend
    from dist_rnn.summaries import setup_logging
    from dist_rnn.training.factory import build_trainer

    path = find_checkpoint(rd.path, checkpoint)
    # vocab.json against the checkpoint first, as generate does: a vocab.json of another run is named as
    # such, not as data that differs from it.
    check_fingerprint(path, accepted_fingerprints(config, tokenizer.identity))
    setup_logging(True)
    setup_tensorflow(config, precision="float32")
    corpus = load_corpus(config.data)
    check_same_data(rd, config, corpus, "evaluate")
    trainer = build_trainer(config, rd, backend=create_backend(config.distribute), corpus=corpus)
    if checkpoint == "latest":
        path = trainer.restore()  # the newest that loads, with checkpoint.fallback
    else:
        trainer.checkpointer.restore(path, accepted_fingerprints(config, tokenizer.identity), trainer.state)
    if dynamic is not None:
        from dist_rnn.training.dynamic_eval import evaluate_split_dynamically

        result = evaluate_split_dynamically(trainer, split, dynamic)
    else:
        result = trainer.evaluate(split).as_dict()
    result["step"] = int(trainer.state.step)
    result["checkpoint"] = path
    return result


def generate(run_dir: str, prime: str, length: int, temperature: float, top_k: int, top_p: float,
             seed: int, num_samples: int, stream=None, model_dir: str | None = None,
             checkpoint: str | None = None, overrides: list[str] = ()) -> list[str]:
    """``dist-rnn generate``: samples from a checkpoint of a run, streaming to ``stream``.

    With ``model_dir`` (instead of ``run_dir``) it samples from a folder written
    by ``dist-rnn export``, loaded as a SavedModel without the model code.
    ``checkpoint`` (``latest`` when None, ``best`` or a path) and
    ``overrides`` (of :data:`~dist_rnn.config.DATA_LOCATION_KEYS`; generate
    reads no data, so they are only checked) apply to ``run_dir``.

    Returns:
        The generated continuations (prime excluded).
    """
    import_tensorflow()
    from dist_rnn.generation import Sampler, check_sampling_args, model_step_fn

    stream = stream if stream is not None else sys.stdout
    check_sampling_args(temperature, top_k, top_p, length, num_samples)
    if (run_dir is None) == (model_dir is None):
        raise UserError("generate needs exactly one of --run-dir (a training run) and --model (an export)")
    if model_dir is not None and (checkpoint is not None or overrides):
        raise UserError("generate: --checkpoint and --set apply to --run-dir, not to --model (an export holds one model)")
    if model_dir is not None:
        from dist_rnn.export import ExportedModel

        exported = ExportedModel(model_dir)
        sampler, tokenizer = exported.sampler(), exported.tokenizer
    else:
        model, tokenizer, _, _ = load_model_for_inference(run_dir, checkpoint or "latest", overrides)
        sampler = Sampler(model_step_fn(model), tokenizer)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    streamer = None
    if num_samples == 1:
        stream.write(prime)
        streamer = _Streamer(stream, tokenizer.text_stream(prime))
    ids = sampler.generate(prime, length, temperature, top_k, top_p, seed, num_samples, streamer, warn)
    texts = [tokenizer.decode(row) for row in ids]
    if num_samples == 1:
        streamer.finish(texts[0])
        stream.write("\n")
    else:
        for i, text in enumerate(texts):
            stream.write(f"--- sample {i} ---\n{prime}{text}\n")
    stream.flush()
    return texts


def export(run_dir: str, out_dir: str, checkpoint: str = "latest") -> dict:
    """``dist-rnn export``: writes a checkpoint of a run as a SavedModel, a ``.keras`` file and the vocabulary.

    Args:
        run_dir: The training run.
        out_dir: Destination folder.
        checkpoint: ``latest``, ``best`` or a checkpoint path.

    Returns:
        The export description (``export.json``) and its path.
    """
    import_tensorflow()
    from dist_rnn.export import export_run

    return export_run(run_dir, out_dir, checkpoint)


class _Streamer:
    """Writes the text of the single sample's new ids as they come (``text_stream``: :meth:`Tokenizer.text_stream`)."""

    def __init__(self, stream, text_stream):
        self.stream, self.text_stream, self.written = stream, text_stream, []

    def __call__(self, ids: list[int]) -> None:
        text = self.text_stream(ids[0])
        if text:
            self.written.append(text)
            self.stream.write(text)
            self.stream.flush()

    def finish(self, text: str) -> None:
        """Writes what the stream held back of the whole decoded ``text`` (an incomplete UTF-8 character)."""
        written = "".join(self.written)
        if text.startswith(written):
            self.stream.write(text[len(written):])


def print_json_line(result: dict) -> None:
    """Prints a result as the last line of stdout (one JSON object)."""
    print(json.dumps(result))


def prepare(config_paths: list[str], overrides: list[str]) -> dict:
    """``dist-rnn prepare``: prepares the config's corpus (or finds it prepared).

    Returns:
        The prepared folder, tokenizer kind, vocabulary size and each split's
        token count.
    """
    from dist_rnn.data.prepare import prepare_corpus, read_manifest
    from dist_rnn.data.progress import log_to_stdout

    config = load_config(config_paths, overrides)
    log_to_stdout()  # pass lines on stdout; stderr keeps errors and a terminal's progress bar
    folder = prepare_corpus(config.data)
    manifest = read_manifest(folder)
    return {"prepared": str(folder), "tokenizer": manifest["tokenizer"]["kind"], "vocab_size": manifest["vocab_size"],
            "tokens": {s: r["tokens"] for s, r in manifest["splits"].items()}}
