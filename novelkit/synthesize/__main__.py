"""`python -m novelkit.synthesize`: see novelkit.synthesize.cli."""

from novelkit.synthesize.cli import main

main()
