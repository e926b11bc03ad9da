"""Shared building blocks for the Baichuan-* folders: data, templates, ROUGE, model loading."""

import sys

from .versions import check_startup

__version__ = "0.1.0"

# Unsupported transformers / peft / accelerate: one line and exit, before anything fails deep inside; the environment
# report itself (`python -m novelkit.env`) still runs.
if sys.orig_argv[1:3] != ["-m", "novelkit.env"]:
    check_startup()
