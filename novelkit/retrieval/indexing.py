"""Filling a VectorStore from files: read and chunk them, register their passages, then embed what is pending.

Every input the readers know is accepted. Novels (.txt files, JSON lines of {name, text} or {text}) are cut into
chapters and chunks by novelkit.data.chunking; records of the other formats become one text each (system, history,
prompt, response), chunked the same way when long. A file whose content is already stored is skipped; a changed file
replaces its old passages. Embedding goes longest passage first and commits every batch, so a killed run loses at
most one batch and a rerun continues where it stopped, cutting the same batches as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from ..data.chunking import chunk_book
from ..data.formats import detect_format, load_samples
from ..data.readers import Book, iter_records, read_books
from ..errors import DataError
from .vector_store import VectorStore

SOURCE_SUFFIXES = (".txt", ".jsonl", ".json", ".tsv")


def source_files(path) -> list[Path]:
    """The file itself, or every readable file under a folder (recursive, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
        if not files:
            raise DataError(path, None, f"no {', '.join(SOURCE_SUFFIXES)} files in this folder")
        return files
    if not path.exists():
        raise DataError(path, None, "file not found")
    return [path]


def read_documents(path: Path) -> list[Book]:
    """A file's texts as books: novels as they are, each record of another format as one text."""
    if path.suffix.lower() == ".txt":
        return read_books(path)
    fmt = detect_format(next(iter(iter_records(path))))
    if fmt in ("text", "novel"):
        return read_books(path)
    return [Book(f"{path.stem}-{s.meta['line']}", _sample_text(s), str(path)) for s in load_samples(path, fmt)]


def _sample_text(sample) -> str:
    turns = [text for pair in sample.history for text in pair]
    return "\n".join(t for t in (sample.system, *turns, sample.prompt, sample.response) if t.strip())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def add_sources(store: VectorStore, path, max_chars: int = 800) -> tuple[int, int]:
    """Register the passages of every file under `path` that is new or changed: (files added, files unchanged)."""
    added = unchanged = 0
    for file in source_files(path):
        sha = file_sha256(file)
        stored_as = store.file_with_hash(sha)
        if stored_as is not None:
            same = "" if stored_as == str(file.resolve()) else f" (same content as {stored_as})"
            print(f"[embed] {file}: unchanged, skipped{same}", flush=True)
            unchanged += 1
            continue
        passages = [(book.name, c.chapter_index, c.chapter_title, c.start, c.text)
                    for book in read_documents(file) for c in chunk_book(book.text, max_chars)]
        store.add_file(str(file.resolve()), sha, passages)
        print(f"[embed] {file}: {len(passages)} passages", flush=True)
        added += 1
    return added, unchanged


def embed_pending(store: VectorStore, embedder, progress: bool = True, ids: list[int] | None = None,
                  shard: tuple[int, int] = (0, 1)) -> int:
    """Embed every passage that has no vector yet (`ids`: store.pending() read earlier), committing each batch;
    returns how many were embedded. `shard` = (rank, world): of the batches an uninterrupted run cuts, embed those
    with batch number % world == rank (each process of a multi-GPU build reads the same pending list first)."""
    ids = store.pending() if ids is None else ids
    rank, world = shard
    batches = [ids[start:start + embedder.batch_size] for start in range(0, len(ids), embedder.batch_size)][rank::world]
    with tqdm(total=sum(map(len, batches)), desc="embed", unit="passage", disable=not progress,
              position=rank) as bar:
        for batch in batches:
            store.store_vectors(batch, embedder.embed_batch(store.texts(batch)))
            bar.update(len(batch))
    return sum(map(len, batches))
