"""Synthesis: novels → instruction data through any OpenAI-compatible chat API (passages: the resumable, concurrent
job; cli: `python -m novelkit.synthesize`).

May import: every stage below it (base … training); not analysis or serve."""
