"""What every row trains on: synthetic char-level text, fixed windows, and the timer that steps through them."""

from __future__ import annotations

import time


def synthetic_text(spec: dict) -> str:
    """Random characters from ``vocab - 1`` symbols (the vocabulary adds ``<unk>``), long enough
    that the timed steps never cross an epoch boundary."""
    import numpy as np

    symbols = [chr(c) for c in range(33, 127)][: spec["vocab"] - 1]
    if len(symbols) < spec["vocab"] - 1:
        symbols += [chr(0x100 + i) for i in range(spec["vocab"] - 1 - len(symbols))]
    steps = (spec["warmup"] + spec["repeats"] + 3) * spec["steps"]
    n = spec["batch"] * (steps * spec["bptt"] + 2)
    ids = np.random.default_rng(0).integers(0, len(symbols), size=n)
    text = "".join(np.asarray(symbols)[ids])
    return "".join(symbols) + text  # every symbol occurs


def windows(spec: dict, count: int = 4):
    """``count`` (inputs, targets) int32 numpy windows of ``[batch, bptt]``."""
    import numpy as np

    rng = np.random.default_rng(1)
    data = rng.integers(0, spec["vocab"], size=(spec["batch"], count * spec["bptt"] + 1)).astype(np.int32)
    t = spec["bptt"]
    return [(data[:, i * t:(i + 1) * t], data[:, i * t + 1:(i + 1) * t + 1]) for i in range(count)]


def window_timer(windows: list, states, step):
    """A ``run(n)`` that times ``n`` calls of ``step(x, y, states) -> (loss, states)``.

    Cycles through ``windows``, carries the state from call to call (and from one
    ``run`` to the next) and waits for the last loss before stopping the clock.
    """
    state = {"states": states, "i": 0}

    def run(n: int) -> float:
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            x, y = windows[state["i"] % len(windows)]
            state["i"] += 1
            loss, state["states"] = step(x, y, state["states"])
        float(loss)
        return time.perf_counter() - start

    return run
