"""The rows to time, from the command line, and their grouping for interleaved timing."""

from __future__ import annotations


def csv(text: str) -> list[str]:
    """The non-empty, stripped items of a comma list."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _base_row(args, cell: str, precision: str, gpu: bool) -> dict:
    """What every row of ``cell`` and ``precision`` shares: sizes, timing, threads (one device, no XLA)."""
    return dict(cell=cell, hidden=args.hidden, layers=args.layers, embedding=args.embedding or args.hidden,
                vocab=args.vocab, batch=args.batch, bptt=args.bptt, precision=precision, backend="none",
                replicas=1, jit=False, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                clip=args.clip, gpu=gpu, intra_threads=args.intra_threads, inter_threads=args.inter_threads,
                torch_threads=args.torch_threads, omp_passive=args.omp_passive, profile=args.profile)


def build_rows(args, torch_ok: bool, gpu: bool) -> tuple[list[dict], list[str]]:
    """The rows to time (grouped by cell and precision later) and notes on skipped ones.

    ``loop`` expands over ``--backend`` and, on one device, ``--jit``; ``step``
    only over ``--jit`` (one device); ``torch`` exists for lstm and gru where
    torch is importable; every other system is one row per cell and precision.
    """
    notes = []
    systems = csv(args.systems)
    backends = csv(args.backend)
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    rows = []
    for precision in csv(args.precision):
        for cell in csv(args.cells):
            base = _base_row(args, cell, precision, gpu)
            for system in systems:
                if system in ("loop", "step"):
                    for backend in backends:
                        for jit in (jits if backend == "none" else [False]):
                            if system == "step" and backend != "none":
                                continue
                            rows.append({**base, "system": system, "backend": backend, "jit": jit,
                                         "replicas": args.replicas if backend == "mirrored" else 1})
                elif system == "step-compiled":
                    from dist_rnn.models.kernels.compiled import COMPILED_CELLS

                    if cell not in COMPILED_CELLS:
                        notes.append(f"{cell}: no compiled op; no 'dist-rnn step compiled' row.")
                        continue
                    rows.append({**base, "system": system})
                elif system == "torch":
                    if not torch_ok:
                        continue
                    if cell not in ("lstm", "gru"):
                        notes.append(f"{cell}: PyTorch has no built-in {cell} layer; no PyTorch row.")
                        continue
                    rows.append({**base, "system": system})
                else:
                    rows.append({**base, "system": system})
    if "torch" in systems and not torch_ok:
        notes.append("PyTorch is not importable in this environment: the PyTorch rows were skipped "
                     "(pip install torch to add them).")
    return rows, notes


def group_rows(rows: list[dict], interleave: str) -> dict[str, list[dict]]:
    """Rows whose timed repeats are interleaved with each other, by group name.

    ``cell``: one group per cell and precision. ``all``: one group per
    precision, so that rows of different cells share the load of the machine.
    """
    groups: dict[str, list[dict]] = {}
    for spec in rows:
        name = spec["precision"] if interleave == "all" else f"{spec['cell']} {spec['precision']}"
        groups.setdefault(name, []).append(spec)
    return groups
