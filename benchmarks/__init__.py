"""torchkiln's benchmark scripts: ``python -m benchmarks.<name> [--quick] [--threads N]``.

Each one compares A and B inside one process (interleaved, after warm-up, threads fixed), prints a
short table to stderr and ends with one JSON line on stdout. ``python -m benchmarks.run_all`` runs them
all and rewrites ``benchmarks/RESULTS.md``. The rules are in BENCHMARKING.md; how to add a benchmark is
in the docstring of :mod:`benchmarks.run_all`.
"""
