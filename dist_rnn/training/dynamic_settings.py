"""The options of ``dist-rnn eval --dynamic``, checked before anything is loaded (no TensorFlow here).

The algorithm is in :mod:`dist_rnn.training.dynamic_eval`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dist_rnn.errors import UserError

#: Update rules: plain gradient steps, or steps scaled per weight by training-gradient RMS.
RULES = ("sgd", "rms")
#: Learning rate and decay of each rule when not given. Chosen on one small run (2 x LSTM 64, char-level
#: tiny-shakespeare, 300 Adam steps, static validation loss 2.147 nats/char; segments of 50): with 16 rows
#: sgd lr 0.3 gave 2.112 (lr 1: 2.204, worse than static), rms lr 0.003 gave 2.104 (lr 0.01: 2.199); with
#: one row sgd lr 0.1 gave 2.089 and lr 0.3 2.091. Other models may want other rates: compare a few.
DEFAULT_LEARNING_RATE = {"sgd": 0.3, "rms": 0.003}
DEFAULT_DECAY = {"sgd": 0.002, "rms": 0.02}


@dataclass
class DynamicSettings:
    """Options of ``dist-rnn eval --dynamic``.

    Attributes:
        rule: ``sgd`` or ``rms`` (see :mod:`dist_rnn.training.dynamic_eval`).
        learning_rate: ``lr``, the step on the segment gradient (>= 0; 0 is static evaluation).
            None: :data:`DEFAULT_LEARNING_RATE` of the rule.
        decay: ``decay`` (lambda in the paper), the pull back towards the
            starting weights per segment (>= 0). None: :data:`DEFAULT_DECAY` of the rule.
        segment: Tokens per segment (one update each). None: the run's ``train.num_steps``.
        batch: Rows (parallel streams) read side by side (>= 1). 1 is the paper's setting; each
            segment costs nearly the same for a few rows on a CPU (one pass over the weights per time
            step), so 16 rows read a split about 16 times faster.
        epsilon: ``rms`` only: added to the gradient RMS before dividing (> 0).
        stat_batches: ``rms`` only: training windows the gradient RMS is collected over (>= 1).
    """

    rule: str = "sgd"
    learning_rate: float | None = None
    decay: float | None = None
    segment: int | None = None
    batch: int = 16
    epsilon: float = 1e-3
    stat_batches: int = 10

    def check(self) -> None:
        """Refuses bad values, naming the ``dist-rnn eval`` option.

        Raises:
            UserError: If a value is out of range.
        """
        if self.rule not in RULES:
            raise UserError(f"--dynamic-rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        checks = [("--dynamic-lr", self.learning_rate, self.learning_rate is None or self.learning_rate >= 0,
                   ">= 0"),
                  ("--dynamic-decay", self.decay, self.decay is None or 0 <= self.decay <= 1, "in [0, 1]"),
                  ("--dynamic-segment", self.segment, self.segment is None or self.segment >= 1, ">= 1"),
                  ("--dynamic-batch", self.batch, self.batch >= 1, ">= 1"),
                  ("--dynamic-epsilon", self.epsilon, self.epsilon > 0, "> 0"),
                  ("--dynamic-stat-batches", self.stat_batches, self.stat_batches >= 1, ">= 1")]
        for option, value, ok, wanted in checks:
            if not ok:  # NaN compares False: refused too
                raise UserError(f"{option} must be {wanted}, got {value}")

    def resolved(self, num_steps: int) -> DynamicSettings:
        """These settings with every None filled in (rule defaults, ``num_steps`` as the segment)."""
        return DynamicSettings(
            self.rule,
            DEFAULT_LEARNING_RATE[self.rule] if self.learning_rate is None else self.learning_rate,
            DEFAULT_DECAY[self.rule] if self.decay is None else self.decay,
            num_steps if self.segment is None else self.segment,
            self.batch, self.epsilon, self.stat_batches)

    def as_dict(self) -> dict:
        """The settings as reported in the eval JSON (``epsilon``/``stat_batches`` only for ``rms``)."""
        out = asdict(self)
        if self.rule != "rms":
            del out["epsilon"], out["stat_batches"]
        return out
