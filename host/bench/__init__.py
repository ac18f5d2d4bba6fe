"""Benchmarks behind `evssd bench ...`.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and writes its
results with :func:`evssd.host.bench.common.write_results` (JSON + PNG under ``results/<name>/``).
"""
