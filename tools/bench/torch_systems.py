"""The PyTorch row (``torch``): nn.Embedding + nn.LSTM/nn.GRU + nn.Linear, Adam, global-norm clipping,
state carried (detached). Runs only where torch is importable."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.protocol import peak_rss_mib, serve
from bench.workload import windows


def torch_profile(run, steps: int) -> list[dict]:
    """torch.profiler over ``steps`` steps, by op (self CPU ms per step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / steps / 1000, 2),
             "ops_per_step": round(e.count / steps)} for e in events]


def _torch_model(spec: dict, torch):
    """The row's architecture as a ``torch.nn.Module``: ``forward(x, state) -> (logits, state)``."""
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[spec["cell"]]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(spec["vocab"], spec["embedding"])
            self.rnn = rnn_cls(spec["embedding"], spec["hidden"], num_layers=spec["layers"], batch_first=True)
            self.projection = torch.nn.Linear(spec["hidden"], spec["vocab"])

        def forward(self, x, state):
            out, state = self.rnn(self.embedding(x), state)
            return self.projection(out), state

    return Model()


def _torch_timer(spec: dict, torch, model, device):
    """A ``run(n)`` that times ``n`` training steps on fixed windows, carrying the (detached) state."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    dtype = {"float32": None, "mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}[spec["precision"]]
    fixed = [(torch.from_numpy(x).long().to(device), torch.from_numpy(y).long().to(device))
             for x, y in windows(spec)]
    state = {"h": None, "i": 0}

    def detach(s):
        return tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, new_state = model(x, state["h"])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, spec["vocab"]), y.reshape(-1))
        loss.backward()
        if spec["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        optimizer.step()
        state["h"] = detach(new_state)
        return loss

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            x, y = fixed[state["i"] % len(fixed)]
            state["i"] += 1
            loss = step(x, y)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def work_torch(spec: dict, workdir: Path) -> None:
    """PyTorch: the same architecture, Adam, global-norm clipping, state carried (detached)."""
    base_rss = peak_rss_mib()
    import torch

    device = torch.device("cuda" if spec.get("gpu") and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(spec.get("torch_threads") or os.cpu_count())
    torch.manual_seed(0)
    model = _torch_model(spec, torch).to(device)
    run = _torch_timer(spec, torch, model, device)

    def memory():
        out = {"peak_rss_mib": peak_rss_mib(), "import_rss_mib": base_rss}
        if device.type == "cuda":
            out["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    info = {"vocab": spec["vocab"], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "parameters": sum(p.numel() for p in model.parameters())}
    serve(spec, run, memory, info, torch_profile)
