"""Benchmarks of FlashFuseMoE against its baselines (``python -m benchmarks.layer``, ``.train``, ``.plot``).

See ``docs/benchmarks.md`` for the method and the commands.
"""
