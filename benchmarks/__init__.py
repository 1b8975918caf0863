"""deformcp's benchmarks: ``harness`` (timing, verification, reports, ``python -m deformcp bench``) and one
``bench_<name>`` module a benchmark. In a source checkout this is the folder benchmarks/ (its scripts run as
``python benchmarks/bench_<name>.py``); installed, the package ``deformcp.benchmarks``."""
