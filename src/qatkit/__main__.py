"""``python -m qatkit`` runs the command line."""

from qatkit.cli.main import main

main()
