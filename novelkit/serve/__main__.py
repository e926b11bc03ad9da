"""`python -m novelkit.serve`: see novelkit.serve.server."""

from novelkit.serve.server import main

main()
