"""optiflow: the classic techniques for training neural networks well, as switches
you can combine, compare and search over, every run tracked in MLflow."""

from importlib.metadata import PackageNotFoundError, version

from optiflow.errors import OptiflowError
from optiflow.hookspecs import hookimpl

try:
    __version__ = version("optiflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["OptiflowError", "__version__", "hookimpl"]
