import csv
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from novelkit.errors import ConfigError
from novelkit.evaluation.ratings import COLUMNS, SUMMARY_HEADERS, Rating, RatingStore, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def rating(model_a, model_b, scores_a, scores_b, winner, rater="li"):
    return Rating(rater, "提示", "输出甲", "输出乙", model_a, model_b, scores_a, scores_b, winner)


def test_summary_per_model_whatever_side(tmp_path):
    store = RatingStore(tmp_path / "r.sqlite")
    store.add(rating("base", "lora", (2, 3, 4), (4, 5, 5), "B"))
    store.add(rating("lora", "base", (5, 4, 3), (1, 2, 3), "A"))  # sides swapped
    store.add(rating("base", "lora", (3, 3, 3), (3, 3, 3), "tie"))
    table = {row[0]: row for row in store.summary()}
    assert set(table) == {"base", "lora"}
    # model, n, 逻辑性, 背景知识, 文风, wins, losses, ties, win rate ((wins + ties / 2) / n), its 95% Wilson interval
    assert table["lora"] == ["lora", 3, 4.0, 4.0, 3.67, 2, 0, 1, "83.3%", "31.0–98.2%"]
    assert table["base"] == ["base", 3, 2.0, 2.67, 3.33, 0, 2, 1, "16.7%", "1.8–69.0%"]


def test_win_rate_interval_is_wilsons():
    # textbook values: 50 of 100 -> [40.38%, 59.62%]; 0 of 10 -> [0, 27.75%]; 9 of 10 -> [59.58%, 98.21%]
    for rate, n, expected in ((0.5, 100, (0.4038, 0.5962)), (0.0, 10, (0.0, 0.2775)), (0.9, 10, (0.5958, 0.9821))):
        assert wilson_interval(rate, n) == pytest.approx(expected, abs=1e-4)


def test_bad_ratings_are_refused_and_nothing_is_stored(tmp_path):
    store = RatingStore(tmp_path / "r.sqlite")
    for bad in (rating("a", "b", (0, 3, 3), (3, 3, 3), "A"), rating("a", "b", (3, 3), (3, 3, 3), "A"),
                rating("a", "b", (3, 3, 3), (3, 3, 3), "C"), rating("a", "b", (3, 3, 3), (3, 3, 3), "A", rater=" ")):
        with pytest.raises(ConfigError):
            store.add(bad)
    assert store.rows() == [] and store.summary() == []


def test_csv_export_has_every_rating(tmp_path):
    store = RatingStore(tmp_path / "r.sqlite")
    store.add(rating("base", "lora", (2, 3, 4), (4, 5, 5), "B", rater="王五"))
    store.add(rating("lora", "base", (5, 4, 3), (1, 2, 3), "tie"))
    path = store.export_csv(tmp_path / "out.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["rater"], r["model_a"], r["logic_b"], r["winner"]) for r in rows] == [("王五", "base", "4", "B"),
                                                                                   ("li", "lora", "1", "tie")]
    assert rows[0]["time"].endswith("Z") and rows[0]["prompt"] == "提示"
    assert not (tmp_path / "out.csv.tmp").exists()


def start_demo(tmp_dir, *flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "--port", str(port), "--max_new_tokens", "12",
                             "--ratings_db", str(tmp_dir / "ratings.sqlite"), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            assert time.time() < deadline, "web_demo.py did not start"
            time.sleep(0.5)
    from gradio_client import Client

    return proc, Client(url, verbose=False)


@pytest.fixture(scope="module")
def demo(default_model_dir, tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("web_demo")
    proc, client = start_demo(tmp_dir)
    yield client, tmp_dir / "ratings.sqlite"
    proc.terminate()
    proc.wait(timeout=30)


def test_chat_streams_growing_text(demo):
    client, _ = demo
    # greedy, 12 new tokens: several chunks, each the whole response so far
    job = client.submit("从前有座山", "", False, 0, 0.85, 5, 1.1, 12, api_name="/chat")
    chunks = list(job)
    assert len(chunks) >= 3
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(chunks, chunks[1:]))
    assert job.result() == chunks[-1] != ""


def test_continuation_streams_and_says_no_retrieval(demo):
    client, _ = demo
    job = client.submit("山里有座庙，庙里有个老和尚。", 0, 0.85, 5, 1.1, 12, api_name="/continue_story")
    outputs = list(job)
    texts = [text for text, _ in outputs]
    assert len(texts) >= 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert "retrieval_index" in outputs[-1][1]


def test_rating_lands_in_sqlite_and_summary(demo):
    client, db = demo
    prompt, out_a, out_b = client.predict(api_name="/next_pair")
    assert prompt.startswith("根据提示写一段小说正文") and out_a and out_b
    status, table = client.predict("评分员甲", 4, 3, 5, 2, 2, 1, "A", api_name="/submit_rating")
    assert "已保存" in status
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT rater, prompt, output_a, output_b, model_a, model_b, logic_a, style_b, winner "
                           "FROM ratings").fetchall()
    assert len(rows) == 1
    rater, stored_prompt, stored_a, stored_b, model_a, model_b, logic_a, style_b, winner = rows[0]
    assert (rater, stored_prompt, stored_a, stored_b, logic_a, style_b, winner) == ("评分员甲", prompt, out_a, out_b,
                                                                                   4, 1, "A")
    assert {model_a, model_b} == {"default (A)", "default (B)"}
    assert table["headers"] == SUMMARY_HEADERS
    summary = {row[0]: row for row in table["data"]}
    assert summary[model_a][1:] == [1, 4.0, 3.0, 5.0, 1, 0, 0, "100.0%", "20.7–100.0%"]  # one rating says little
    assert summary[model_b][1:] == [1, 2.0, 2.0, 1.0, 0, 1, 0, "0.0%", "0.0–79.3%"]
    # the pair is used up: a second submission without a new pair is refused, not stored twice
    with pytest.raises(Exception):
        client.predict("评分员甲", 4, 3, 5, 2, 2, 1, "A", api_name="/submit_rating")
    exported = client.predict(api_name="/export_csv")
    with open(exported, encoding="utf-8-sig", newline="") as f:
        assert [r["rater"] for r in csv.DictReader(f)] == ["评分员甲"]


def test_continuation_shows_retrieved_passages(default_model_dir, shared_data, tmp_path):
    from novelkit.data.readers import read_text
    from novelkit.retrieval.embedding import Embedder
    from novelkit.retrieval.indexing import add_sources, embed_pending
    from novelkit.retrieval.vector_store import VectorStore

    book = read_text(shared_data / "novels" / "hongloumeng.txt")[:3000]
    (tmp_path / "hongloumeng.txt").write_text(book, encoding="utf-8")
    embedder = Embedder.load(str(default_model_dir), batch_size=8, device="cpu")
    store = VectorStore.create_or_open(tmp_path / "index", embedder.describe())
    add_sources(store, tmp_path / "hongloumeng.txt", 300)
    embed_pending(store, embedder, progress=False)
    store.sync()
    store.close()
    proc, client = start_demo(tmp_path, "--retrieval_index", str(tmp_path / "index"), "--recap_tokens", "200")
    try:
        text, passages = client.predict(book[1000:1300], 0, 0.85, 5, 1.1, 8, api_name="/continue_story")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert text and passages.startswith("前情提要")
    shown = [line.split("）")[-1].rstrip("…")[:20] for line in passages.splitlines()[1:] if line.strip()]
    assert shown and all(len(piece) >= 10 and piece in book for piece in shown)
