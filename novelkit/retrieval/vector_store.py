"""A folder of text passages and their vectors: meta.sqlite is the record, index.faiss the search structure.

meta.sqlite holds the source files (path, content hash), the passages (book, chapter, character offset, text) and a
copy of every passage's vector, all written in transactions: a killed run never leaves a vector without its passage
or the reverse. index.faiss (exact inner product, or HNSW for millions of vectors) is rebuilt from it at the end of a
run; after a crash it lags behind, and `sync()` (run by every build and by `repair`) catches it up from the stored
vectors without embedding anything again.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import ConfigError, DataError

INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
INDEX_TYPES = ("flat", "hnsw")  # exact inner product; approximate graph search for millions of vectors
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128
_CHUNK = 500  # ids per SQL query (SQLite limits the number of parameters)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, sha256 TEXT NOT NULL);
-- AUTOINCREMENT never reuses an id, so a stale vector left in index.faiss cannot pass for a new passage
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, file_id INTEGER NOT NULL REFERENCES files(id), book TEXT NOT NULL,
    chapter_index INTEGER NOT NULL, chapter TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
    text TEXT NOT NULL, vector BLOB);
CREATE INDEX IF NOT EXISTS passages_by_file ON passages(file_id);
CREATE INDEX IF NOT EXISTS passages_by_book ON passages(book, end);
"""


@dataclass
class Passage:
    id: int
    book: str
    chapter: str
    chapter_index: int
    start: int  # character offset in the book (or record) text
    text: str
    source: str  # the file it came from
    score: float = 0.0


class VectorStore:
    def __init__(self, folder: Path, conn: sqlite3.Connection):
        self.folder, self.conn = folder, conn
        info = dict(conn.execute("SELECT key, value FROM info"))
        self.embedding = json.loads(info["embedding"])  # Embedder.describe() of the model that made the vectors
        self.index_type = json.loads(info["index_type"])
        self.dim = self.embedding["dim"]
        self.index = None  # loaded by load_checked() or sync()

    @classmethod
    def create_or_open(cls, folder, embedding: dict, index_type: str = "flat") -> VectorStore:
        """The store in `folder`, created with these settings when there is none yet."""
        if index_type not in INDEX_TYPES:
            raise ConfigError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        conn = _connect(folder / META_FILE)
        with conn:  # schema and settings in one transaction: a store is either fully set up or not at all
            conn.executescript("BEGIN;" + _SCHEMA)
            conn.execute("INSERT OR IGNORE INTO info VALUES ('embedding', ?), ('index_type', ?)",
                         (json.dumps(embedding), json.dumps(index_type)))
        return cls(folder, conn)

    @classmethod
    def open(cls, folder, missing_ok: bool = False) -> VectorStore | None:
        """An existing store; DataError when `folder` holds none (None instead with missing_ok, also for a store
        whose creation was interrupted: create_or_open finishes it)."""
        folder = Path(folder)
        meta = folder / META_FILE
        if not meta.is_file():
            if missing_ok:
                return None
            what = "no such folder" if not folder.exists() else f"no embedding index here ({META_FILE} missing)"
            raise DataError(folder, None, f"{what}; build one with Baichuan-Embedding/run_embedding.sh")
        conn = _connect(meta)
        try:
            keys = {k for (k,) in conn.execute("SELECT key FROM info")}
        except sqlite3.OperationalError:
            keys = set()  # no tables yet
        except sqlite3.DatabaseError as e:
            raise DataError(meta, None, f"not a readable embedding index: {e}") from None
        if not {"embedding", "index_type"} <= keys:
            conn.close()
            if missing_ok:
                return None
            raise DataError(meta, None, "its creation was interrupted; build the index again")
        return cls(folder, conn)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ files and passages

    def file_with_hash(self, sha256: str) -> str | None:
        """The path under which this content is already stored, if it is."""
        row = self.conn.execute("SELECT path FROM files WHERE sha256 = ?", (sha256,)).fetchone()
        return row[0] if row else None

    def add_file(self, path: str, sha256: str, passages: list[tuple[str, int, str, int, str]]) -> int:
        """Register a file's passages (book, chapter_index, chapter, start, text), not yet embedded, in one
        transaction; an older version of the same path goes in the same transaction. Returns the passage count."""
        with self.conn:
            old = [i for (i,) in self.conn.execute("SELECT id FROM files WHERE path = ?", (path,))]
            self.conn.executemany("DELETE FROM passages WHERE file_id = ?", [(i,) for i in old])
            self.conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in old])
            file_id = self.conn.execute("INSERT INTO files (path, sha256) VALUES (?, ?)", (path, sha256)).lastrowid
            self.conn.executemany(
                "INSERT INTO passages (file_id, book, chapter_index, chapter, start, end, text) VALUES (?,?,?,?,?,?,?)",
                [(file_id, book, ci, ch, start, start + len(text), text) for book, ci, ch, start, text in passages])
        return len(passages)

    def pending(self) -> list[int]:
        """Ids of passages without a vector, longest text first (ties by id), so batches pad little and a rerun
        after a kill cuts the same batches as the first run."""
        return [i for (i,) in self.conn.execute(
            "SELECT id FROM passages WHERE vector IS NULL ORDER BY length(text) DESC, id")]

    def texts(self, ids: list[int]) -> list[str]:
        found = {}
        for part in _chunks(ids):
            found.update(self.conn.execute(f"SELECT id, text FROM passages WHERE id IN ({_marks(part)})", part))
        return [found[i] for i in ids]

    def store_vectors(self, ids: list[int], vectors: np.ndarray) -> None:
        """Write a batch of vectors in one transaction."""
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} vectors of dimension {self.dim}, got shape {vectors.shape}")
        with self.conn:
            self.conn.executemany("UPDATE passages SET vector = ? WHERE id = ?",
                                  [(v.astype(np.float32).tobytes(), i) for i, v in zip(ids, vectors)])

    def counts(self) -> dict:
        files, passages, embedded = self.conn.execute(
            "SELECT (SELECT count(*) FROM files), count(*), count(vector) FROM passages").fetchone()
        return {"files": files, "passages": passages, "embedded": embedded}

    def passages(self, ids: list[int], scores=None) -> list[Passage]:
        """Passages in the order of `ids`."""
        found = {}
        for part in _chunks(ids):
            for row in self.conn.execute(
                    "SELECT p.id, p.book, p.chapter, p.chapter_index, p.start, p.text, f.path FROM passages p "
                    f"JOIN files f ON f.id = p.file_id WHERE p.id IN ({_marks(part)})", part):
                found[row[0]] = Passage(*row)
        out = [found[i] for i in ids]
        for passage, score in zip(out, scores if scores is not None else []):
            passage.score = float(score)
        return out

    # ------------------------------------------------------------ the FAISS index

    def sync(self) -> tuple[int, int]:
        """Make index.faiss hold exactly the stored vectors, saving it when that changed it: (added, dropped)."""
        index = self._read_index(strict=False)
        rebuilt = index is None or index.d != self.dim
        if rebuilt:
            index = self._new_index()
        stored = np.array([i for (i,) in self.conn.execute("SELECT id FROM passages WHERE vector IS NOT NULL")],
                          dtype=np.int64)
        extra = np.setdiff1d(_ids(index), stored)
        if extra.size:
            try:
                index.remove_ids(extra)
            except RuntimeError:  # HNSW cannot remove: build it again from the stored vectors
                index, rebuilt = self._new_index(), True
        missing = np.setdiff1d(stored, _ids(index))
        for part in _chunks(missing.tolist(), 10 * _CHUNK):
            ids, vectors = self._vectors(f"id IN ({_marks(part)})", part)
            index.add_with_ids(vectors, ids)
        if rebuilt or extra.size or missing.size:
            self._save(index)
        self.index = index
        return int(missing.size), int(extra.size)

    def load_checked(self):
        """Load index.faiss for searching; DataError with the fix when it does not match meta.sqlite."""
        embedded = self.counts()["embedded"]
        if embedded == 0:
            raise DataError(self.folder, None, "the index is empty: no passage has been embedded yet; "
                                               "build it with Baichuan-Embedding/run_embedding.sh")
        index = self._read_index(strict=True)
        where = self.folder / INDEX_FILE
        repair = f"run: python Baichuan-Embedding/embed.py repair --index {self.folder}"
        if index is None:
            raise DataError(where, None, f"missing, while {META_FILE} has {embedded} embedded passages; {repair}")
        if index.d != self.dim:
            raise DataError(where, None, f"holds {index.d}-dimensional vectors but the index's model makes "
                                         f"{self.dim}-dimensional ones; {repair}")
        if index.ntotal != embedded:
            raise DataError(where, None, f"holds {index.ntotal} vectors but {META_FILE} has {embedded} embedded "
                                         f"passages (a build is running or was interrupted); {repair}")
        self.index = index
        return index

    def search(self, query: np.ndarray, k: int) -> list[Passage]:
        """The k nearest passages of the whole index, best first."""
        index = self.index if self.index is not None else self.load_checked()
        scores, ids = index.search(query.reshape(1, -1).astype(np.float32), k)
        keep = ids[0] >= 0
        return self.passages(ids[0][keep].tolist(), scores[0][keep])

    def search_book(self, query: np.ndarray, k: int, book: str, before: int | None = None) -> list[Passage]:
        """The k nearest passages of one book that end at or before character `before`, scored exactly (one
        book's vectors are few, and a filtered approximate search could miss them)."""
        if not self.conn.execute("SELECT 1 FROM passages WHERE book = ? LIMIT 1", (book,)).fetchone():
            books = [b for (b,) in self.conn.execute("SELECT DISTINCT book FROM passages LIMIT 10")]
            raise ConfigError(f"book {book!r} is not in the index {self.folder}; its books include: {', '.join(books)}")
        where, params = "book = ? AND vector IS NOT NULL", [book]
        if before is not None:
            where, params = where + " AND end <= ?", params + [before]
        ids, vectors = self._vectors(where, params)
        scores = vectors @ query.astype(np.float32)
        top = np.argsort(-scores, kind="stable")[:k]
        return self.passages(ids[top].tolist(), scores[top])

    def _vectors(self, where: str, params) -> tuple[np.ndarray, np.ndarray]:
        rows = self.conn.execute(f"SELECT id, vector FROM passages WHERE {where} ORDER BY id", params).fetchall()
        ids = np.array([i for i, _ in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(v for _, v in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ids, vectors

    def _new_index(self):
        if self.index_type == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = HNSW_EF_SEARCH  # saved with the index
            return faiss.IndexIDMap2(graph)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _read_index(self, strict: bool):
        """index.faiss, or None when it is missing (or, unless strict, unreadable: it will be rebuilt)."""
        path = self.folder / INDEX_FILE
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            if strict:
                raise DataError(path, None, "cannot be read (damaged?); run: python Baichuan-Embedding/embed.py "
                                            f"repair --index {self.folder}") from None
            return None
        return index

    def _save(self, index) -> None:
        path = self.folder / INDEX_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _connect(path: Path) -> sqlite3.Connection:
    # searched from a web server's worker threads too; written by one process per GPU in a multi-GPU build
    conn = sqlite3.connect(path, check_same_thread=False, timeout=300)
    conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; a killed writer loses nothing committed
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _ids(index) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def _chunks(items: list, size: int = _CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _marks(items) -> str:
    return ",".join("?" * len(items))
