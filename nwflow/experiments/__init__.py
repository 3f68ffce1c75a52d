"""Command-line entry points for the scaled runs of the chapters.

Each module ``nwflow.experiments.<name>`` has the presets ``smoke``, ``cpu`` and ``gpu``, a
``run_experiment(config, ...)`` and a ``main`` (``python -m nwflow.experiments.<name>
--preset gpu``) that writes ``nwflow.settings.results_dir()`` JSON with provenance; the
shared parts live in :mod:`nwflow.experiments._runner`.
"""
