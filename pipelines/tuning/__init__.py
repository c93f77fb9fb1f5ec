"""Sweeps of training runs on Ray Tune, compared in MLflow (``pipelines/sweep.py`` is the entry point).

* ``spec``: the sweep YAML as a frozen ``SweepSpec``, every key and value checked before any trial starts;
* ``space``: the search space as ``ray.tune`` objects, and a trial's ``{"section.key": value}`` overrides;
* ``concurrency``: how many trials the cluster fits at once;
* ``trial``: the trial function, the same training run as ``pipelines/train.py`` (``training.launcher.run``)
  inside a Tune trial, reporting through ``TuneReportCallback``;
* ``tracking``: the sweep's parent MLflow run, each trial's child run and how it ended;
* ``results``: the results table and the best trial's config;
* ``driver``: the ``Tuner`` (new or restored) and the steps around it.
"""
