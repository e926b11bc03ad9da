"""Does retrieval help continuation? Perplexity of a held-out book's true text with and without a 前情提要 block.

At --positions evenly spaced passage starts of the book (past its first --start_fraction), the model reads the
--context_chars characters before the position and is scored on the next --continuation_chars, once as is and once
with a 前情提要 block in front: the --k passages of the same book most related to that context, among those ending
before the context starts, within --token_budget tokens. Both runs score the same positions and the same tokens.
The book is embedded into --index first (appended, or skipped when unchanged). Writes <output_dir>/metrics.json.
    python Baichuan-Embedding/eval_retrieval.py --book ../shared/data/novels/xiyouji.txt
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.data.chunking import chunk_book
from novelkit.data.readers import read_books
from novelkit.errors import ConfigError, exit_on_error
from novelkit.models.loading import load_model, load_tokenizer, resolve_model_path
from novelkit.outputs import write_json_atomic
from novelkit.retrieval.embedding import Embedder
from novelkit.retrieval.indexing import add_sources, embed_pending
from novelkit.retrieval.recap import Retriever, recap_for
from novelkit.retrieval.vector_store import VectorStore

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--book", default=str(ROOT.parent / "shared" / "data" / "novels" / "xiyouji.txt"),
                   help="a .txt novel the model was not trained on")
    p.add_argument("--model_path", default="", help="the language model; empty = the embedded default")
    p.add_argument("--embedding_model", default="", help="model that embeds the passages; empty = --model_path")
    p.add_argument("--index", default="output/retrieval_eval/index", help="index folder (built or appended to)")
    p.add_argument("--output_dir", default="output/retrieval_eval")
    p.add_argument("--positions", type=int, default=32)
    p.add_argument("--start_fraction", type=float, default=0.2, help="positions start this far into the book")
    p.add_argument("--context_chars", type=int, default=400)
    p.add_argument("--continuation_chars", type=int, default=200)
    p.add_argument("--k", type=int, default=4, help="passages retrieved per position")
    p.add_argument("--token_budget", type=int, default=512, help="tokens of the 前情提要 block")
    p.add_argument("--max_chars", type=int, default=400, help="passage size of the index")
    p.add_argument("--batch_size", type=int, default=16, help="passages per embedding batch")
    p.add_argument("--dtype", default="auto")
    return p.parse_args()


@torch.inference_mode()
def continuation_nll(model, tokenizer, prefix: str, continuation: str) -> tuple[float, int]:
    """Summed negative log-likelihood of the continuation's tokens after the prefix, and their count. The pieces
    are tokenised on their own, so the continuation is the same tokens whatever the prefix."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    head = bos + tokenizer.encode(prefix, add_special_tokens=False)
    target = tokenizer.encode(continuation, add_special_tokens=False)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "model_max_length", None)
    if limit and len(head) + len(target) > limit:
        raise ConfigError(f"前情提要, context and continuation take {len(head) + len(target)} tokens, more than the "
                          f"model's {limit}: lower --token_budget, --context_chars or --continuation_chars")
    ids = torch.tensor([head + target], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, len(head) - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum").item(), len(target)


@exit_on_error
def main():
    args = parse_args()
    start_time = time.time()
    model_path = resolve_model_path(args.model_path)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=args.dtype).eval()

    # 1. the book's passages in the index, embedded by the embedding model (the language model itself by default)
    embedding_path = resolve_model_path(args.embedding_model) if args.embedding_model else model_path
    if embedding_path == model_path:
        embedder = Embedder(model, tokenizer, model_path=model_path, batch_size=args.batch_size)
    else:
        embedder = Embedder.load(embedding_path, dtype=args.dtype, batch_size=args.batch_size)
    store = VectorStore.open(args.index, missing_ok=True) or VectorStore.create_or_open(args.index, embedder.describe())
    embedder.check_against(store.embedding, args.index)
    add_sources(store, args.book, args.max_chars)
    embed_pending(store, embedder)
    store.sync()
    retriever = Retriever(args.index, embedder=embedder)

    # 2. positions: passage starts (sentence boundaries) spread evenly over the book after its first part
    book = read_books(args.book)[0]
    starts = [c.start for c in chunk_book(book.text, args.max_chars)
              if c.start >= args.start_fraction * len(book.text) and c.start + args.continuation_chars <= len(book.text)]
    if len(starts) < args.positions:
        raise ConfigError(f"{args.book} has only {len(starts)} usable positions; ask for fewer (--positions)")
    chosen = [starts[i * len(starts) // args.positions] for i in range(args.positions)]

    # 3. the same continuation scored after the context alone and after 前情提要 + context
    rows = []
    for position in chosen:
        context_start = max(0, position - args.context_chars)
        context = book.text[context_start:position]
        continuation = book.text[position:position + args.continuation_chars]
        block = recap_for(retriever, context, tokenizer, k=args.k, token_budget=args.token_budget, book=book.name,
                          before=context_start)
        plain_nll, tokens = continuation_nll(model, tokenizer, context, continuation)
        recap_nll, _ = continuation_nll(model, tokenizer, block + context, continuation)
        recap_tokens = len(tokenizer.encode(block, add_special_tokens=False))
        rows.append({"position": position, "tokens": tokens, "recap_tokens": recap_tokens,
                     "nll_without": round(plain_nll, 4), "nll_with": round(recap_nll, 4)})
        print(f"[eval] @{position}: ppl {math.exp(plain_nll / tokens):.2f} -> {math.exp(recap_nll / tokens):.2f} "
              f"with {recap_tokens} tokens of 前情提要", flush=True)

    tokens = sum(r["tokens"] for r in rows)
    metrics = {
        "book": str(args.book), "model": model_path, "embedding_model": embedding_path, "index": args.index,
        "positions": len(rows), "scored_tokens": tokens, "context_chars": args.context_chars,
        "continuation_chars": args.continuation_chars, "k": args.k, "token_budget": args.token_budget,
        "mean_recap_tokens": round(sum(r["recap_tokens"] for r in rows) / len(rows), 1),
        "ppl_without_retrieval": round(math.exp(sum(r["nll_without"] for r in rows) / tokens), 4),
        "ppl_with_retrieval": round(math.exp(sum(r["nll_with"] for r in rows) / tokens), 4),
        "seconds": round(time.time() - start_time, 1), "per_position": rows,
    }
    out = Path(args.output_dir) / "metrics.json"
    write_json_atomic(out, metrics)
    print(f"\nperplexity of the true continuation over {len(rows)} positions ({tokens} tokens): "
          f"{metrics['ppl_without_retrieval']} without retrieval, {metrics['ppl_with_retrieval']} with "
          f"(前情提要 mean {metrics['mean_recap_tokens']} tokens)\nwrote {out}")


if __name__ == "__main__":
    main()
