"""``python -m optiflow`` (what ``torchrun -m optiflow`` runs)."""

from optiflow.cli import main

main()
