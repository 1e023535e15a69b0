"""``python -m qatkit`` runs the command line."""

from .cli import main

main()
