"""The registry of measured systems: the one table of what ``--systems`` can name, their labels and workers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class System:
    """One kind of row.

    Attributes:
        label: the row's name in the tables (``label()`` adds backend, replicas and XLA).
        worker: ``"module.function"`` in this package that the row's worker process runs
            as ``function(spec, workdir)``; it speaks ``bench.protocol``.
        env: environment variables set for the row's worker process.
        default: whether the row is timed when ``--systems`` is not given.
    """

    label: str
    worker: str
    env: dict = field(default_factory=dict)
    default: bool = True


SYSTEMS: dict[str, System] = {
    "loop": System("dist-rnn loop", "dist_rnn_systems.work_loop"),
    "step": System("dist-rnn step", "dist_rnn_systems.work_step"),
    # The compiled recurrence (#22), interleaved with "step" in one run; opt-in: its first use builds the op.
    "step-compiled": System("dist-rnn step compiled", "dist_rnn_systems.work_step",
                            env={"DIST_RNN_COMPILED_KERNELS": "on"}, default=False),
    "floor": System("minimal loop (dist-rnn model)", "keras_systems.work_minimal"),
    "keras": System("minimal loop (Keras layers)", "keras_systems.work_minimal"),
    "fit": System("Keras model.fit", "keras_systems.work_fit"),
    "torch": System("PyTorch", "torch_systems.work_torch"),
}


def label(spec: dict) -> str:
    """A row's name in the tables, e.g. ``dist-rnn loop mirrored x2`` or ``PyTorch nn.LSTM``."""
    name = SYSTEMS[spec["system"]].label
    if spec["system"] == "torch":
        name = f"PyTorch nn.{spec['cell'].upper()}"
    if spec["system"] in ("loop", "step"):
        if spec["backend"] != "none":
            name += f" {spec['backend']} x{spec['replicas']}"
        if spec["jit"]:
            name += " XLA"
    return name
