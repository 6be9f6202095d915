"""The experiment scripts: the demo, the paper-claim grids and their report, the benchmarks.

Each is a module run from the repository root as ``python -m experiments.<name>`` (``demo``,
``grid``, ``claims``, ``storage_table``, ``bench_step``, ``bench_remat``, ``bench_codec``,
``bench_input``, ``make_embedded_dataset``); they import each other as ``from experiments import
grid``. ``experiments.common`` holds what they share (the machine description every record
carries, config loading, record writing). Their records and reports are under
``experiments/results/``.
"""
