"""optiflow-example: a third-party optiflow plugin (Lion, spirals and two-moons, EMA of the weights).

The hook implementations live in :mod:`optiflow_example.plugin`, which the
``optiflow`` entry point of this distribution names.  Nothing here imports
torch at import time, so ``optiflow --help`` stays fast with the plugin installed.
"""
