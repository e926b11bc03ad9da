"""Baichuan-Embedding on real novels with the embedded default model: vectors, the local index, its faults, retrieval."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from novelkit.data.chunking import chunk_book
from novelkit.data.formats import to_sample
from novelkit.data.readers import iter_records, read_text
from novelkit.errors import ConfigError, DataError, ModelError
from novelkit.models.loading import load_model
from novelkit.retrieval.embedding import Embedder
from novelkit.retrieval.indexing import add_sources, embed_pending, read_documents
from novelkit.retrieval.recap import RECAP_HEADER, Retriever, add_recaps, recap_block, recap_for
from novelkit.retrieval.vector_store import INDEX_FILE, META_FILE, VectorStore

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Embedding"
MAX_CHARS = 200
CPU_ONLY = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # fp32 on the CPU everywhere: runs compare bit for bit


def run(*args, ok=True, env=None):
    out = subprocess.run([*map(str, args)], cwd=ROOT, env=dict(CPU_ONLY, **(env or {})), capture_output=True,
                         text=True, timeout=300)
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def table(folder):
    """Every passage row (vectors included) and the FAISS index's ids and vectors, for exact comparisons."""
    with sqlite3.connect(folder / META_FILE) as conn:
        rows = conn.execute("SELECT p.id, f.path, f.sha256, p.book, p.chapter_index, p.chapter, p.start, p.end, "
                            "p.text, p.vector FROM passages p JOIN files f ON f.id = p.file_id ORDER BY p.id").fetchall()
    index = faiss.read_index(str(folder / INDEX_FILE))
    ids = faiss.vector_to_array(index.id_map)
    return rows, sorted(zip(ids.tolist(), (index.reconstruct(int(i)).tobytes() for i in ids)))


@pytest.fixture(scope="module")
def novels(shared_data, tmp_path_factory):
    """Openings of three real novels: a.txt (红楼梦, UTF-8), b.txt (水浒传, re-encoded as GB18030), c.txt (西游记)."""
    d = tmp_path_factory.mktemp("novels")
    (d / "books").mkdir()
    (d / "books" / "a.txt").write_text(read_text(shared_data / "novels" / "hongloumeng.txt")[:8000], encoding="utf-8")
    (d / "books" / "b.txt").write_text(read_text(shared_data / "novels" / "shuihuzhuan.txt")[:4000],
                                       encoding="gb18030")
    (d / "c.txt").write_text(read_text(shared_data / "novels" / "xiyouji.txt")[:4000], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def embedder(default_model_dir):
    return Embedder.load(str(default_model_dir), batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def index_a(novels, embedder, tmp_path_factory):
    """An index of a.txt, built in this process."""
    folder = tmp_path_factory.mktemp("index") / "a"
    store = VectorStore.create_or_open(folder, embedder.describe())
    assert add_sources(store, novels / "books" / "a.txt", MAX_CHARS) == (1, 0)
    assert embed_pending(store, embedder, progress=False) == store.counts()["passages"] > 30
    store.sync()
    store.close()
    return folder


def light_edit(text: str) -> str:
    """A few characters changed, one removed, one inserted: what a copy-editor or a pirate site does."""
    chars = list(text)
    for at in (len(chars) // 5, len(chars) // 2, 4 * len(chars) // 5):
        chars[at] = "的" if chars[at] != "的" else "了"
    del chars[len(chars) // 3]
    chars.insert(2 * len(chars) // 3, "，")
    return "".join(chars)


# ---------------------------------------------------------------- vectors


def test_vectors_are_unit_length_and_independent_of_batch_padding(embedder, novels, default_model_dir):
    texts = [line.strip()[:150] for line in read_text(novels / "c.txt").split("\n") if line.strip()][2:8]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed_batch([t])[0] for t in texts])
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-5)  # right padding and the mask keep pad tokens out
    model, tok = embedder.model, embedder.tokenizer
    last = Embedder(model, tok, pooling="last").embed(texts)
    layer1 = Embedder(model, tok, layer=1).embed(texts)
    assert np.allclose(np.linalg.norm(last, axis=1), 1, atol=1e-5)
    assert not np.allclose(last, together, atol=1e-3) and not np.allclose(layer1, together, atol=1e-3)
    with pytest.raises(ConfigError, match="layer 9 does not exist"):
        Embedder(model, tok, layer=9)
    with pytest.raises(ConfigError, match="unknown pooling"):
        Embedder(model, tok, pooling="cls")


def test_bf16_vectors_fit_an_fp32_index(index_a, embedder, default_model_dir):
    """An index built in fp32 on a CPU can be searched in bf16 on a GPU, and the reverse (here both on the CPU)."""
    half = Embedder.load(str(default_model_dir), dtype="bf16", device="cpu")
    assert half.model.dtype == torch.bfloat16
    half.check_against(VectorStore.open(index_a).embedding, str(index_a))
    texts = VectorStore.open(index_a).texts([3, 9, 20])
    assert (half.embed(texts) * embedder.embed(texts)).sum(1).min() > 0.999


@pytest.mark.gpu
def test_bf16_on_the_gpu_matches_fp32_on_the_cpu(index_a, embedder, default_model_dir):
    gpu = Embedder.load(str(default_model_dir), batch_size=8)  # dtype "auto": bf16 on a GPU
    assert gpu.model.dtype == torch.bfloat16 and next(gpu.model.parameters()).is_cuda
    gpu.check_against(VectorStore.open(index_a).embedding, str(index_a))
    texts = VectorStore.open(index_a).texts(list(range(1, 25)))
    assert (gpu.embed(texts) * embedder.embed(texts)).sum(1).min() > 0.999


def test_every_supported_format_becomes_documents():
    sft = read_documents(ROOT / "data_examples" / "sft" / "dev.jsonl")
    assert len(sft) == 12 and sft[0].name == "dev-1" and "\n" in sft[0].text
    novels = read_documents(ROOT / "data_examples" / "formats" / "novel.jsonl")
    assert novels[0].name == "灯下客" and novels[0].text.startswith("第一章")
    papers = read_documents(ROOT / "data_examples" / "formats" / "papers.tsv")
    assert papers and all(d.text.strip() for d in papers)


# ---------------------------------------------------------------- search


def test_lightly_edited_copy_finds_its_original_first(index_a, embedder):
    retriever = Retriever(index_a, embedder=embedder)
    ids = [i for (i,) in retriever.store.conn.execute("SELECT id FROM passages WHERE length(text) > 80 ORDER BY id")]
    for original in retriever.store.passages(ids[:: len(ids) // 5]):
        edited = light_edit(original.text)
        assert edited != original.text
        hits = retriever.search(edited, k=3)
        assert hits[0].id == original.id, (original.text[:40], [h.text[:40] for h in hits])
        assert hits[0].score > hits[1].score and hits[0].book == "a" and hits[0].source.endswith("a.txt")
    assert retriever.search(original.text, k=1)[0].score == pytest.approx(1.0, abs=1e-4)


def test_index_and_metadata_survive_a_restart(index_a, embedder):
    with sqlite3.connect(index_a / META_FILE) as conn:
        pid, start, chapter, text = conn.execute("SELECT id, start, chapter, text FROM passages "
                                                 "WHERE length(text) > 150 ORDER BY id LIMIT 1 OFFSET 5").fetchone()
    log = run(sys.executable, FOLDER / "embed.py", "search", "--index", index_a, "--top_k", 3, light_edit(text))
    first = [line for line in log.splitlines() if line.startswith("1. ")][0]
    assert f"a  {chapter}  @{start}" in first and first.endswith("a.txt)"), log[-2000:]
    assert Retriever(index_a, embedder=embedder).search(light_edit(text), k=1)[0].id == pid


# ---------------------------------------------------------------- appending and resuming


def test_adding_a_file_embeds_only_that_file(index_a, novels, embedder, tmp_path):
    folder = tmp_path / "ab"
    shutil.copytree(index_a, folder)
    before_rows, _ = table(folder)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DATA": str(novels / "books"),
           "INDEX_DIR": str(folder), "MAX_CHARS": str(MAX_CHARS), "BATCH": "8"}
    log = run("bash", FOLDER / "run_embedding.sh", env=env)
    b_count = len(chunk_book(read_text(novels / "books" / "b.txt"), MAX_CHARS))
    assert "a.txt: unchanged, skipped" in log and f"b.txt: {b_count} passages" in log
    assert f"{b_count} passages embedded" in log and "1 files added, 1 unchanged" in log
    rows, index = table(folder)
    assert rows[:len(before_rows)] == before_rows  # a.txt's passages and vectors untouched
    assert len(rows) == len(before_rows) + b_count and len(index) == len(rows)
    assert "楔子　张天师" in read_documents(novels / "books" / "b.txt")[0].text[:20]  # GB18030 decoded

    # a changed file replaces its old passages, in meta.sqlite and in index.faiss
    changed = tmp_path / "b.txt"
    changed.write_text(read_text(novels / "books" / "b.txt")[:1500], encoding="utf-8")
    store = VectorStore.open(folder)
    assert add_sources(store, changed, MAX_CHARS) == (1, 0) and add_sources(store, changed, MAX_CHARS) == (0, 1)
    first = embed_pending(store, embedder, progress=False)
    assert store.sync() == (first, 0)
    changed.write_text(read_text(novels / "books" / "b.txt")[:1000], encoding="utf-8")
    assert add_sources(store, changed, MAX_CHARS) == (1, 0)
    second = embed_pending(store, embedder, progress=False)
    assert store.sync() == (second, first)  # the old version's vectors left the index
    rows_now, index_now = table(folder)
    assert rows_now[:len(rows)] == rows and len(rows_now) == len(rows) + second == len(index_now)


def test_a_killed_run_resumes_to_the_same_index(novels, embedder, tmp_path):
    clean = tmp_path / "clean"
    store = VectorStore.create_or_open(clean, embedder.describe())
    add_sources(store, novels / "c.txt", MAX_CHARS)
    total = embed_pending(store, Embedder(embedder.model, embedder.tokenizer, model_path=embedder.model_path,
                                          batch_size=2), progress=False)
    store.sync()

    killed = tmp_path / "killed"
    cmd = [sys.executable, FOLDER / "embed.py", "build", "--index", killed, "--data", novels / "c.txt",
           "--max_chars", MAX_CHARS, "--batch_size", 2, "--model_path", embedder.model_path]
    proc = subprocess.Popen([*map(str, cmd)], cwd=ROOT, env=CPU_ONLY, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done, deadline = 0, time.time() + 120
    while done < 6 and time.time() < deadline:  # SIGKILL once three batches are committed
        time.sleep(0.01)
        try:  # read-only: never create the file the run is about to create
            with sqlite3.connect(f"file:{killed / META_FILE}?mode=ro", uri=True) as conn:
                done = conn.execute("SELECT count(vector) FROM passages").fetchone()[0]
        except sqlite3.Error:
            pass
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    with sqlite3.connect(killed / META_FILE) as conn:
        done = conn.execute("SELECT count(vector) FROM passages").fetchone()[0]
    assert 6 <= done < total and not (killed / INDEX_FILE).exists()

    # a search now says what is wrong; the rerun finishes the job and equals the uninterrupted run
    with pytest.raises(DataError, match="missing, while meta.sqlite has"):
        VectorStore.open(killed).load_checked()
    log = run(*cmd)
    assert f"resuming: {total - done} passages of an interrupted run" in log
    assert f"{total - done} passages embedded" in log
    assert table(killed) == table(clean)


def test_a_build_on_two_processes_resumes_to_the_same_index(novels, embedder, tmp_path):
    """run_embedding.sh with NUM_GPUS=2 (two gloo CPU processes) finishing a run stopped after three batches: each
    process embeds every other remaining batch, and the index equals the uninterrupted one-process build."""
    clean = tmp_path / "clean"
    store = VectorStore.create_or_open(clean, embedder.describe())
    add_sources(store, novels / "c.txt", MAX_CHARS)
    two = Embedder(embedder.model, embedder.tokenizer, model_path=embedder.model_path, batch_size=2)
    total = embed_pending(store, two, progress=False)
    store.sync()

    stopped = tmp_path / "stopped"  # as a run killed after its first three batches leaves it
    store = VectorStore.create_or_open(stopped, embedder.describe())
    add_sources(store, novels / "c.txt", MAX_CHARS)
    assert embed_pending(store, two, progress=False, ids=store.pending()[:6]) == 6 < total - 4
    log = run("bash", FOLDER / "run_embedding.sh", env=dict(
        MODEL_PATH=str(embedder.model_path), DATA=str(novels / "c.txt"), INDEX_DIR=str(stopped),
        MAX_CHARS=str(MAX_CHARS), BATCH="2", NUM_GPUS="2", MASTER_PORT="29751",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert "2 processes" in log and f"{total - 6} passages embedded" in log
    assert table(stopped) == table(clean)


# ---------------------------------------------------------------- faults


def other_model(default_model_dir, folder, **changes):
    """A tiny model like the default one but with other weights (and `changes` to its shape)."""
    model = load_model(str(default_model_dir), device="cpu")
    config = model.config.__class__.from_dict({**model.config.to_dict(), **changes})
    torch.manual_seed(1)
    type(model)(config).save_pretrained(folder)
    for f in default_model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    return folder


def test_another_model_or_dimension_is_a_clear_error(index_a, default_model_dir, tmp_path):
    recorded = VectorStore.open(index_a).embedding
    narrow = other_model(default_model_dir, tmp_path / "narrow", hidden_size=64, intermediate_size=176)
    with pytest.raises(ModelError, match=r"was built by .*hidden_size 128.*is .*hidden_size 64"):
        Embedder.for_index(recorded, str(index_a), str(narrow))
    reseeded = other_model(default_model_dir, tmp_path / "reseeded")
    with pytest.raises(ModelError, match="same shape but other weights"):
        Embedder.for_index(recorded, str(index_a), str(reseeded))
    with pytest.raises(ConfigError, match="built with pooling mean, not last"):
        Embedder.for_index(recorded, str(index_a), pooling="last")


def test_missing_empty_and_out_of_step_indexes(index_a, embedder, tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        Retriever(tmp_path / "nowhere", embedder=embedder)
    log = run(sys.executable, FOLDER / "embed.py", "build", "--data", tmp_path / "no.txt", "--index", tmp_path / "new",
              ok=False)
    assert log.strip().splitlines()[-1] == f"error: {tmp_path / 'no.txt'}: file not found"
    assert not (tmp_path / "new").exists()  # checked before anything is created or loaded
    VectorStore.create_or_open(tmp_path / "empty", embedder.describe()).close()
    with pytest.raises(DataError, match="the index is empty"):
        Retriever(tmp_path / "empty", embedder=embedder)

    folder = tmp_path / "crashed"
    shutil.copytree(index_a, folder)
    rows, index = table(folder)
    lagging = faiss.read_index(str(folder / INDEX_FILE))
    lagging.remove_ids(np.array([i for i, _ in index[-5:]], dtype=np.int64))  # the last batch never reached it
    faiss.write_index(lagging, str(folder / INDEX_FILE))
    log = run(sys.executable, FOLDER / "embed.py", "search", "--index", folder, "宝玉", ok=False)
    last = log.strip().splitlines()[-1]
    assert f"holds {len(rows) - 5} vectors but meta.sqlite has {len(rows)}" in last and "repair" in last
    assert "5 vectors added" in run(sys.executable, FOLDER / "embed.py", "repair", "--index", folder)
    assert table(folder) == (rows, index)

    faiss.write_index(faiss.IndexIDMap2(faiss.IndexFlatIP(64)), str(folder / INDEX_FILE))
    with pytest.raises(DataError, match="holds 64-dimensional vectors"):
        VectorStore.open(folder).load_checked()
    (folder / INDEX_FILE).unlink()
    with pytest.raises(DataError, match="missing"):
        VectorStore.open(folder).load_checked()
    assert VectorStore.open(folder).sync() == (len(rows), 0)
    assert table(folder) == (rows, index)


def test_hnsw_index_finds_what_the_exact_one_finds(novels, embedder, index_a, tmp_path):
    store = VectorStore.create_or_open(tmp_path / "hnsw", VectorStore.open(index_a).embedding, "hnsw")
    add_sources(store, novels / "books" / "a.txt", MAX_CHARS)
    exact = VectorStore.open(index_a)
    ids = [i for (i,) in exact.conn.execute("SELECT id FROM passages WHERE vector IS NOT NULL ORDER BY id")]
    store.store_vectors(ids, np.stack([np.frombuffer(v, np.float32) for (v,) in exact.conn.execute(
        "SELECT vector FROM passages ORDER BY id")]))  # same vectors, no need to embed again
    store.sync()
    query = embedder.embed_batch([light_edit(exact.texts(ids[7:8])[0])])[0]
    assert store.load_checked().ntotal == len(ids)
    assert [p.id for p in store.search(query, 3)] == [p.id for p in exact.search(query, 3)]


# ---------------------------------------------------------------- retrieval for continuation


def test_recap_uses_only_earlier_passages_and_keeps_its_budget(index_a, embedder, default_tokenizer):
    retriever = Retriever(index_a, embedder=embedder)
    book = read_text(retriever.store.passages([1])[0].source)
    position = len(book) // 2
    context = book[position - 300:position]
    hits = retriever.search(context, k=6, book="a", before=position - 300)
    assert len(hits) == 6 and all(h.start + len(h.text) <= position - 300 and h.book == "a" for h in hits)
    assert retriever.search(context, k=6, book="a", before=0) == []
    for budget in (10, 40, 100, 300, 1000):
        block = recap_for(retriever, context, default_tokenizer, k=4, token_budget=budget, book="a",
                          before=position - 300)
        assert len(default_tokenizer.encode(block, add_special_tokens=False)) <= budget
        if budget >= 100:
            assert block.startswith(RECAP_HEADER)
    whole = recap_block(hits[:3], default_tokenizer, 10_000)
    assert all(h.text in whole for h in hits[:3])
    starts = sorted(hits[:3], key=lambda h: h.start)
    assert whole.index(starts[0].text) < whole.index(starts[1].text) < whole.index(starts[2].text)  # book order
    cut = recap_block(hits[:3], default_tokenizer, 150)
    assert cut.rstrip().endswith("…")
    with pytest.raises(ConfigError, match="book 'nope' is not in the index"):
        retriever.search(context, book="nope")


def test_predict_with_a_retrieval_index(index_a, novels, embedder, default_tokenizer, tmp_path):
    book = read_text(novels / "books" / "a.txt")
    rows = [{"instruction": "续写下文", "input": book[p - 200:p], "output": book[p:p + 60], "book": "a",
             "position": p - 200} for p in (4000, 6500)]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    records = list(iter_records(data))
    samples = add_recaps([to_sample(r, "alpaca") for r in records], records, Retriever(index_a, embedder=embedder),
                         default_tokenizer, k=3, token_budget=120)
    for sample, row in zip(samples, rows):
        prompt = "续写下文\n" + row["input"]
        block = sample.prompt[:-len(prompt)]
        assert sample.prompt.endswith(prompt) and block.startswith(RECAP_HEADER)
        assert len(default_tokenizer.encode(block, add_special_tokens=False)) <= 120

    adapter = tmp_path / "adapter"  # an untrained adapter: run_predict.sh always loads one
    base = load_model(embedder.model_path, device="cpu")
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(adapter)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LORA_MODEL": str(adapter),
           "DATA": str(data), "OUTPUT_DIR": str(tmp_path / "pred"), "MAX_NEW_TOKENS": "4",
           "RETRIEVAL_INDEX": str(index_a)}
    log = run("bash", ROOT / "Baichuan-Finetune-Lora" / "run_predict.sh", env=env)
    assert f"[predict] 前情提要 from {index_a}: 4 passages, at most 512 tokens" in log
    assert len((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()) == 2

    data.write_text(json.dumps({**rows[0], "position": "early"}, ensure_ascii=False) + "\n", encoding="utf-8")
    records = list(iter_records(data))
    with pytest.raises(DataError, match=re.escape(f"{data}:1: field 'position' must be a character offset")):
        add_recaps([to_sample(records[0], "alpaca")], records, Retriever(index_a, embedder=embedder),
                   default_tokenizer)


def test_eval_retrieval_reports_perplexity_with_and_without(novels, tmp_path):
    out = tmp_path / "eval"
    run(sys.executable, FOLDER / "eval_retrieval.py", "--book", novels / "c.txt", "--index", out / "index",
        "--output_dir", out, "--positions", 3, "--token_budget", 96, "--context_chars", 200,
        "--continuation_chars", 80, "--max_chars", 400)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["positions"] == len(metrics["per_position"]) == 3
    assert all(0 < r["recap_tokens"] <= 96 and r["tokens"] > 0 for r in metrics["per_position"])
    assert metrics["scored_tokens"] == sum(r["tokens"] for r in metrics["per_position"])
    for key in ("ppl_without_retrieval", "ppl_with_retrieval"):
        assert 1 < metrics[key] < 1e6
