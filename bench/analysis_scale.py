"""Analyse a generated novel corpus of any size (default 1 GiB) and report wall time and peak memory.

The corpus is one .txt file (the hard case: a single huge book, streamed in blocks) made by cycling through the
chapters of real novels with fresh chapter numbers. Peak memory is the analysing process's own maximum resident set
size (getrusage), so it includes Python, torch and the tokenizer (~400 MB before reading a byte).

Run from the repo root: python bench/analysis_scale.py [--size_mb 1024] [--token_every 50]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from novelkit.data.chunking import split_chapters  # noqa: E402
from novelkit.data.readers import read_books  # noqa: E402

# Runs a script as __main__ and prints its peak RSS (KiB on Linux) on stderr when it exits, errors included.
PEAK_RSS_RUNNER = (
    "import atexit, resource, runpy, sys; "
    "atexit.register(lambda: print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "file=sys.stderr)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def default_source() -> Path:
    shared = ROOT.parent / "shared" / "data" / "novels"
    return shared if shared.is_dir() else ROOT / "data_examples" / "novels"


def write_corpus(path, size_bytes: int, source=None) -> int:
    """Write chapters of the novels under `source`, renumbered 第1章, 第2章 …, until the file has `size_bytes`
    bytes of UTF-8; returns the number of chapters written."""
    chapters = [c.text for book in read_books(source or default_source()) for c in split_chapters(book.text)
                if c.title and c.text.strip()]
    written = n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while written < size_bytes:
            n += 1
            text = f"第{n}章 第{n}回\n{chapters[n % len(chapters)]}"
            f.write(text)
            written += len(text.encode("utf-8"))
    return n


def run_with_peak_rss(script, *args, env=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run a Python script in a fresh interpreter; returns the finished process and its peak RSS in bytes."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, str(script), *map(str, args)], env=env,
                         capture_output=True, text=True)
    peak = [line for line in out.stderr.splitlines() if line.startswith("peak_rss_kib ")]
    return out, int(peak[-1].split()[1]) * 1024 if peak else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_mb", type=int, default=1024)
    p.add_argument("--token_every", type=int, default=50, help="tokenize 1 chapter in N (as in analyze_data.py)")
    p.add_argument("--workdir", default="", help="where the corpus and report go; default: a temporary folder")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="novelkit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    start = time.time()
    chapters = write_corpus(corpus, args.size_mb << 20)
    print(f"wrote {corpus}: {corpus.stat().st_size / 2**20:.0f} MiB, {chapters} chapters, "
          f"{time.time() - start:.0f} s", flush=True)
    start = time.time()
    out, peak = run_with_peak_rss(ROOT / "Baichuan-Analysis" / "analyze_data.py", "--data", corpus,
                                  "--token_every", args.token_every, "--output_dir", work / "report")
    seconds = time.time() - start
    if out.returncode:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    print(f"analysed in {seconds:.0f} s ({corpus.stat().st_size / 2**20 / seconds:.1f} MiB/s), "
          f"peak RSS {peak / 2**20:.0f} MiB; report: {work / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
