"""The harness behind ``tools/benchmark.py``: two programs in one package.

The parent (``tools/benchmark.py`` without ``--worker``) decides the rows, starts
one worker process per row, interleaves their timed repeats and writes the
report. Each worker (``tools/benchmark.py --worker SPEC``) builds one system,
warms it up and answers the parent's ``run`` commands with timed repeats. They
talk over stdin/stdout (``protocol``).

Parent side:
    rows        the rows to time from the command line, and their grouping for interleaving
    runner      one ``Worker`` subprocess per row, interleaved timed rounds, the summary of a row
    report      ratios, targets, ``results.md`` and ``results.png``
    machine     CPU, memory, library versions, GPU visibility

Worker side:
    worker            runs a row's system in a scratch directory
    protocol          the ``@@BENCH`` line protocol and ``serve`` (warm up, ready, answer ``run``)
    workload          synthetic text, fixed windows, the timer that steps through them
    tf_support        TensorFlow threads, memory and profiler
    dist_rnn_systems  ``loop`` and ``step``: a real dist-rnn Trainer (``assemble_trainer``)
    keras_systems     ``floor``, ``keras`` (a minimal hand-written loop) and ``fit``
    torch_systems     ``torch``

Shared: ``systems`` is the one table of system names, labels and worker functions.

Adding a measurement (a new system, e.g. a compiled recurrence or an output layer):

1. Write ``bench/<name>_systems.py`` with ``work_<name>(spec, workdir)``. It builds
   what it measures from the row ``spec`` (sizes, precision, threads, ...; see
   ``rows._base_row``), makes ``run(n) -> seconds`` for ``n`` training steps
   (``workload.window_timer`` does this for a ``step(x, y, states)``), and ends
   with ``protocol.serve(spec, run, memory, info)``. Import heavy libraries
   inside the function: the parent imports nothing of the worker side.
2. Register it in ``systems.SYSTEMS`` (name, label, ``"<module>.work_<name>"``):
   ``--systems`` then accepts it (and runs it by default) and ``build_rows`` makes
   one row per cell and precision. Only a system that expands over more settings (as ``loop`` does over
   ``--backend`` and ``--jit``) needs a branch in ``rows.build_rows``, and
   ``systems.label`` if that shows in its name.
3. Ratios against the dist-rnn loop appear in ``results.md`` by themselves; a
   target with a goal goes in ``report._comparator_targets``.

A measurement that is not tokens per training step (corpus preparation
throughput, say) also needs its own figure in ``runner.summarize`` and its own
table in ``report``: today every row is summarized as ``batch x bptt`` tokens per step.
"""
