"""A report folder: report.md (tables, with the plots referenced), report.json (every number) and PNG plots."""

from __future__ import annotations

from pathlib import Path

from ..outputs import write_json_atomic, write_text_atomic
from .plots import save_figure


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats get 4 significant digits."""
    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def write_report(out_dir, markdown: str, data: dict, figures: dict) -> list[Path]:
    """Write the plots ({file name: Figure}), then report.json and report.md; returns the files written."""
    out = Path(out_dir)
    written = []
    for name, fig in figures.items():
        save_figure(fig, out / name)
        written.append(out / name)
    write_json_atomic(out / "report.json", data)
    write_text_atomic(out / "report.md", markdown.rstrip() + "\n")
    return written + [out / "report.json", out / "report.md"]
