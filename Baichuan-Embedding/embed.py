"""Text vectors stored locally: embed files into an index folder, search it, or repair it after a crash.

The index folder holds meta.sqlite (files, passages with book / chapter / character offset / text, and their vectors)
and index.faiss (exact inner product, or HNSW). Building again on the same folder appends new files, skips unchanged
ones (by content hash) and resumes a killed run. Run the build through run_embedding.sh, or directly:
    python Baichuan-Embedding/embed.py build --data data_examples/novels --index output/embedding
    python Baichuan-Embedding/embed.py search --index output/embedding "师父被妖怪捉去了"
    python Baichuan-Embedding/embed.py repair --index output/embedding
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.errors import ConfigError, exit_on_error
from novelkit.retrieval.embedding import POOLINGS, Embedder
from novelkit.retrieval.indexing import add_sources, embed_pending, source_files
from novelkit.retrieval.recap import Retriever
from novelkit.retrieval.vector_store import INDEX_TYPES, VectorStore
from novelkit.shards import gather_to_first, start_shards, stop_shards, wait_for_all

DEFAULTS = {"pooling": "mean", "layer": -1, "max_length": 1024, "index_type": "flat"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--index", default="output/embedding", help="index folder")
    common.add_argument("--model_path", default="", help="model folder; empty = the index's own model "
                                                         "(for a new index: the embedded default)")
    common.add_argument("--dtype", default="auto", help="auto = bf16 on a GPU, fp32 on CPU")
    common.add_argument("--batch_size", type=int, default=16, help="texts per forward pass (and per commit)")
    commands = p.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", parents=[common], help="embed a file or folder into the index")
    build.add_argument("--data", default="data_examples/novels",
                       help="a .txt novel, a folder, or a .jsonl/.json/.tsv file in any supported format")
    build.add_argument("--max_chars", type=int, default=800, help="passage size in characters")
    # None = the index's setting, or the default for a new index; a different value on an existing index is an error
    build.add_argument("--pooling", choices=POOLINGS, default=None, help="mean over tokens (default) or last token")
    build.add_argument("--layer", type=int, default=None, help="hidden state to pool: -1 = last (default), "
                                                               "0 = embeddings, 1..L = after that layer")
    build.add_argument("--max_length", type=int, default=None, help="tokens per passage (default 1024)")
    build.add_argument("--index_type", choices=INDEX_TYPES, default=None,
                       help="flat = exact (default); hnsw = approximate, for millions of vectors")

    search = commands.add_parser("search", parents=[common], help="the passages nearest to a query")
    search.add_argument("query")
    search.add_argument("--top_k", type=int, default=5)

    commands.add_parser("repair", parents=[common],
                        help="rebuild what index.faiss lacks from meta.sqlite, embed passages left without a vector")
    return p.parse_args()


def index_embedder(args, store):
    """The index's own model and settings unless others are given; a mismatch is an error."""
    overrides = {k: getattr(args, k, None) for k in ("pooling", "layer", "max_length")}
    return Embedder.for_index(store.embedding, args.index, args.model_path, dtype=args.dtype,
                              batch_size=args.batch_size, **overrides)


def build(args):
    source_files(args.data)  # a wrong path fails before a model is loaded
    if args.max_chars < 1:
        raise ConfigError(f"--max_chars must be at least 1, got {args.max_chars}")
    rank, world = start_shards()  # run_embedding.sh: one process per GPU, each embeds every world-th batch
    store = VectorStore.open(args.index, missing_ok=True) if rank == 0 else None
    if rank == 0 and store is None:
        settings = {k: DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                    for k in ("pooling", "layer", "max_length")}
        embedder = Embedder.load(args.model_path, dtype=args.dtype, batch_size=args.batch_size, **settings)
        store = VectorStore.create_or_open(args.index, embedder.describe(), args.index_type or DEFAULTS["index_type"])
    elif rank == 0:
        embedder = index_embedder(args, store)
        if args.index_type not in (None, store.index_type):
            raise ConfigError(f"{args.index} is a {store.index_type} index, not {args.index_type}: "
                              f"use another --index folder")
    if rank == 0:
        print(f"[embed] model {embedder.model_path}  pooling {embedder.pooling}  layer {embedder.layer}  "
              f"dim {embedder.dim}  index {args.index} ({store.index_type})"
              + (f"; {world} processes" if world > 1 else ""), flush=True)
        pending = len(store.pending())
        if pending:
            print(f"[embed] resuming: {pending} passages of an interrupted run have no vector yet", flush=True)
        added, unchanged = add_sources(store, args.data, args.max_chars)
    wait_for_all()  # the index exists and every passage is registered
    if rank != 0:
        store = VectorStore.open(args.index)
        embedder = index_embedder(args, store)
    pending = store.pending()
    wait_for_all()  # every process has the same list before any vector is written
    embedded = gather_to_first(embed_pending(store, embedder, ids=pending, shard=(rank, world)))
    stop_shards()
    if rank != 0:
        return
    store.sync()  # index.faiss from the stored vectors, written once at the end
    counts = store.counts()
    print(f"[embed] {added} files added, {unchanged} unchanged; {sum(embedded)} passages embedded; the index now holds "
          f"{counts['embedded']} passages from {counts['files']} files")


def search(args):
    if args.top_k < 1:
        raise ConfigError(f"--top_k must be at least 1, got {args.top_k}")
    retriever = Retriever(args.index, args.model_path, dtype=args.dtype)
    for rank, p in enumerate(retriever.search(args.query, args.top_k), 1):
        where = "  ".join(x for x in (p.book, p.chapter, f"@{p.start}") if x)
        print(f"{rank}. {p.score:.4f}  {where}  ({p.source})")
        text = " ".join(p.text.split())  # one line
        print(f"   {text[:150]}{' …' if len(text) > 150 else ''}")


def repair(args):
    store = VectorStore.open(args.index)
    pending = len(store.pending())
    if pending:  # passages registered by a killed build: their text is stored, so no source file is needed
        embed_pending(store, index_embedder(args, store))
    added, dropped = store.sync()
    counts = store.counts()
    print(f"[repair] embedded {pending} pending passages; index.faiss: {added} vectors added from meta.sqlite, "
          f"{dropped} without a passage dropped; now {counts['embedded']} passages from {counts['files']} files")


@exit_on_error
def main():
    args = parse_args()
    {"build": build, "search": search, "repair": repair}[args.command](args)


if __name__ == "__main__":
    main()
