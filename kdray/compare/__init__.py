"""``kdray compare``: rows (configs) x seeds trained, resumably and in parallel, then one table of mean ± std
per row, paired differences against a baseline row, a plot, an MLflow parent run and one record per run.

- :mod:`kdray.compare.study`: what is trained (rows, seeds, overrides; the study file's schema);
- :mod:`kdray.compare.runner`: running it (one process per run, resume, records, the MLflow parent run);
- :mod:`kdray.compare.table`: the tables (also every table of ``docs/results.md``);
- :mod:`kdray.compare.plots`: the plot.
"""
