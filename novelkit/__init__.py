"""Shared building blocks for the Baichuan-* folders: data, templates, ROUGE, model loading."""

__version__ = "0.1.0"
