"""Serving: the OpenAI-compatible HTTP server (server: `python -m novelkit.serve`) and the API's request shapes
(api_protocol).

May import: every stage below it (base … training); not analysis or synthesize."""
