"""Where novelkit keeps what it builds once and reuses: the embedded default model, torch.compile's caches.
`$NOVELKIT_HOME`, else ~/.cache/novelkit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("NOVELKIT_HOME", Path.home() / ".cache" / "novelkit"))
