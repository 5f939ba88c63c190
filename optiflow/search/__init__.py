"""Hyper-parameter search on Optuna, mapped onto MLflow runs: the space, the study, the trials, the summary.

``optiflow.commands.search`` runs a search; import what you need from the submodules.
"""
