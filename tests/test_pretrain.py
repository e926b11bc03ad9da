"""Baichuan-Pretrain on the real novels in ../shared/data: corpus cache, packing, training, resume, perplexity."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from novelkit.errors import ConfigError, DataError
from novelkit.evaluation.lm_eval import continuation_points, sliding_window_perplexity
from novelkit.models.loading import load_model, load_tokenizer
from novelkit.data.pretraining import (CleaningRules, CorpusCleaner, PackedBlocks, build_token_cache, tokenize_document,
                                  train_eval_blocks)
from novelkit.data.readers import Book, read_text

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Pretrain"


@pytest.fixture(scope="module")
def cache(shared_data, default_model_dir, tmp_path_factory):
    return build_token_cache(shared_data / "novels", default_model_dir, tmp_path_factory.mktemp("cache"),
                             eval_books=["xiyouji"], num_proc=2, load_tokenizer=load_tokenizer)


def test_held_out_book_never_in_training_blocks(cache, shared_data, default_tokenizer):
    assert cache.meta["books"] == {"train": ["hongloumeng", "shuihuzhuan"], "eval": ["xiyouji"]}
    train, held = cache.tokens("train").tobytes(), cache.tokens("eval").tobytes()
    book = CorpusCleaner(CleaningRules()).clean(Book("xiyouji", read_text(shared_data / "novels" / "xiyouji.txt"), ""))
    rng = np.random.default_rng(0)
    for start in rng.integers(1000, len(book) - 1000, size=5):
        # a stretch of the held-out book, tokenised as the cache does: found in eval, never in train
        piece = book[book.index("\n", start) + 1:][:300]
        piece = piece[: piece.rindex("\n")]
        needle = np.asarray(default_tokenizer.encode(piece, add_special_tokens=False), dtype=cache.dtype).tobytes()
        assert needle in held and needle not in train


def test_stream_is_each_cleaned_book_plus_eos_and_packing_loses_nothing(cache, shared_data, default_tokenizer):
    cleaner = CorpusCleaner(CleaningRules())
    expected = []
    for name in ("hongloumeng", "shuihuzhuan"):
        text = cleaner.clean(Book(name, read_text(shared_data / "novels" / f"{name}.txt"), ""))
        expected += tokenize_document(text, default_tokenizer)
    stream = cache.tokens("train")
    assert stream.tolist() == expected and expected.count(default_tokenizer.eos_token_id) >= 2
    blocks = PackedBlocks(stream, 1000)
    packed = np.concatenate([blocks[i]["input_ids"].numpy() for i in range(len(blocks))])
    assert len(blocks) == len(stream) // 1000
    assert packed.tolist() + stream[len(blocks) * 1000:].tolist() == stream.tolist()


def test_cache_is_reused_and_rebuilt_on_change(cache, shared_data, default_model_dir, tmp_path, capsys):
    again = build_token_cache(shared_data / "novels", default_model_dir, cache.folder.parent, eval_books=["xiyouji"],
                              load_tokenizer=load_tokenizer)
    assert again.folder == cache.folder and "reusing token cache" in capsys.readouterr().out
    corpus = tmp_path / "novels"
    corpus.mkdir()
    (corpus / "a.txt").write_text("第一章 开始\n" + "".join(f"第{i}夜，山门外雨声渐密，少年握紧了剑。\n" for i in range(30)), encoding="utf-8")
    first = build_token_cache(corpus, default_model_dir, tmp_path / "c", load_tokenizer=load_tokenizer)
    (corpus / "b.txt").write_text("第一章 又一本\n" + "".join(f"第{i}夜，灯火在远处闪烁。\n" for i in range(30)), encoding="utf-8")
    second = build_token_cache(corpus, default_model_dir, tmp_path / "c", load_tokenizer=load_tokenizer)
    assert second.folder != first.folder and second.meta["books"]["train"] == ["a", "b"]


def test_cleaning_removes_boilerplate_and_duplicates():
    text = "\n".join(["第一章 雨夜", "少年推开山门，看见满院的梨花。", "手机阅读请访问 www.example.com",
                      "（本章完）", "少年推开山门，看见满院的梨花。", "他说：“走吧，天亮之前要翻过这座山。”请记住本书首发域名xx"])
    cleaner = CorpusCleaner(CleaningRules(min_book_chars=10))
    out = cleaner.clean(Book("b", text, ""))
    assert out == "第一章 雨夜\n少年推开山门，看见满院的梨花。\n他说：“走吧，天亮之前要翻过这座山。”"
    r = cleaner.report
    assert r.duplicate_paragraphs == 1 and r.removed_by_pattern[r"[（(]?本章完[）)]?"] == 1
    assert cleaner.clean(Book("short", "短句。", "")) is None
    assert r.dropped_books[0][0] == "short"


def test_unreadable_and_headless_books_are_reported(tmp_path, default_model_dir, capsys):
    corpus = tmp_path / "novels"
    corpus.mkdir()
    (corpus / "good.txt").write_text("第一章 好\n" + "".join(f"江湖夜雨十年灯，第{i}杯酒。\n" for i in range(40)), encoding="utf-8")
    (corpus / "empty.txt").write_text("", encoding="utf-8")
    (corpus / "plain.txt").write_text("".join(f"没有章节标题的一本书，第{i}行。\n" for i in range(40)), encoding="gb18030")
    c = build_token_cache(corpus, default_model_dir, tmp_path / "c", load_tokenizer=load_tokenizer)
    out = capsys.readouterr().out
    assert "dropped book empty" in out and "1 book(s) have no chapter headings" in out
    assert c.meta["books"]["train"] == ["good", "plain"]


def test_corpus_smaller_than_a_block_and_unknown_eval_book(tmp_path, default_model_dir):
    corpus = tmp_path / "n.txt"
    corpus.write_text("第一章 短\n" + "".join(f"第{i}句话。\n" for i in range(60)), encoding="utf-8")
    c = build_token_cache(corpus, default_model_dir, tmp_path / "c", load_tokenizer=load_tokenizer)
    with pytest.raises(DataError, match="fewer than one block of MAX_LENGTH=4096"):
        train_eval_blocks(c, 4096)
    with pytest.raises(ConfigError, match="EVAL_BOOKS .'nope'. not found"):
        build_token_cache(corpus, default_model_dir, tmp_path / "c", eval_books=["nope"], load_tokenizer=load_tokenizer)
    (tmp_path / "ads.txt").write_text("本章完\n手机阅读 www.example.com\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text left after cleaning"):
        build_token_cache(tmp_path / "ads.txt", default_model_dir, tmp_path / "c", load_tokenizer=load_tokenizer)


def test_sliding_window_perplexity_equals_direct_loop(default_model_dir, default_tokenizer):
    model = load_model(str(default_model_dir), device="cpu")
    ids = default_tokenizer.encode("山门外雨声渐密，少年握紧了剑。他推开门，看见满院的梨花。" * 3, add_special_tokens=False)
    w = 16
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):  # every token with exactly its w-1 preceding tokens as context
            ctx = torch.tensor([ids[max(0, t - (w - 1)):t]])
            nll += F.cross_entropy(model(ctx).logits[0, -1:], torch.tensor([ids[t]])).item()
    ours = sliding_window_perplexity(model, ids, window=w, stride=1, progress=False)
    assert ours["tokens"] == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(np.exp(nll / (len(ids) - 1)), rel=1e-5)
    whole = sliding_window_perplexity(model, ids, window=len(ids), progress=False)
    with torch.no_grad():
        hf = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert whole["perplexity"] == pytest.approx(np.exp(hf), rel=1e-5)
    assert continuation_points(1000, 100, 50, 3) == [100, 525, 950]


def run_pretrain(out, *extra, kill_at=None):
    cmd = [sys.executable, str(FOLDER / "pretrain.py"), "--output_dir", str(out), *map(str, extra)]
    if kill_at is None:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / kill_at / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.3)  # let the checkpoint finish writing
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return ""


def step_losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_pretrain_loss_falls_and_kill_resume_keeps_data_order(shared_data, tmp_path, default_model_dir):
    args = ["--corpus", shared_data / "novels", "--eval_books", "xiyouji", "--max_length", 128, "--max_steps", 36,
            "--per_device_train_batch_size", 4, "--learning_rate", 2e-3, "--logging_steps", 1, "--save_steps", 12,
            "--eval_strategy", "no", "--report_to", "none", "--cache_dir", tmp_path / "cache", "--num_proc", 1]
    clean = run_pretrain(tmp_path / "clean", *args)
    losses = step_losses(tmp_path / "clean" / "checkpoint-36")
    first, last = np.mean([losses[s] for s in range(1, 7)]), np.mean([losses[s] for s in range(31, 37)])
    assert last < first - 0.5, (first, last)
    assert "reusing token cache" not in clean

    run_pretrain(tmp_path / "killed", *args, kill_at="checkpoint-24")
    log = run_pretrain(tmp_path / "killed", *args)
    assert "reusing token cache" in log and "resuming from" in log and "checkpoint-24" in log
    resumed = step_losses(tmp_path / "killed" / "checkpoint-36")
    for step in range(25, 37):  # the steps after the kill see the same blocks in the same order
        assert resumed[step] == pytest.approx(losses[step], rel=1e-4), step


def test_from_scratch_trains_tokenizer_and_model(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 256}))
    out = tmp_path / "scratch"
    log = run_pretrain(out, "--model_config", config, "--vocab_size", 3000, "--max_length", 64, "--max_steps", 20,
                       "--learning_rate", 3e-3, "--per_device_train_batch_size", 8, "--logging_steps", 1,
                       "--eval_fraction", 0.1, "--eval_strategy", "steps", "--eval_steps", 20, "--report_to", "none")
    assert "training a 3000-piece SentencePiece tokenizer" in log
    tok = load_tokenizer(str(out))
    model = load_model(str(out), device="cpu")
    assert model.config.vocab_size == len(tok) <= 3000 and model.config.hidden_size == 32
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_perplexity" in h or "eval_token_accuracy" in h]
    assert {"eval_perplexity", "eval_token_accuracy"} <= {k for h in evals for k in h}


def test_max_length_beyond_positions_is_an_error(tmp_path):
    out = subprocess.run([sys.executable, str(FOLDER / "pretrain.py"), "--output_dir", str(tmp_path),
                          "--max_length", "100000"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "MAX_LENGTH=100000 is more than the model's" in out.stderr


def test_evaluate_script_perplexity_matches_model_loss(tmp_path, default_model_dir, default_tokenizer):
    book = tmp_path / "held.txt"
    book.write_text("第一章 雨夜\n" + "山门外雨声渐密，少年握紧了剑。\n" * 12, encoding="utf-8")
    args = ["--model_path", default_model_dir, "--book", book, "--output_dir", tmp_path / "eval", "--window", 2048,
            "--positions", 2, "--context_tokens", 16, "--new_tokens", 8]
    res = subprocess.run([sys.executable, str(FOLDER / "evaluate.py"), *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ids = default_tokenizer.encode(read_text(book), add_special_tokens=False)
    model = load_model(str(default_model_dir), device="cpu")
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert metrics["perplexity"]["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert metrics["continuations"]["positions"] == 2 and "rouge-chinese/char" in metrics
    assert "| perplexity (sliding window) |" in res.stdout


def test_evaluation_on_two_processes_equals_one(tmp_path, default_model_dir):
    """run_predict.sh with NUM_GPUS=2 (two gloo CPU processes): every window and point scored once, the same numbers."""
    book = tmp_path / "held.txt"
    book.write_text("第一章 雨夜\n" + "山门外雨声渐密，少年握紧了剑。师父说：“走吧。”\n" * 40, encoding="utf-8")
    env = dict(os.environ, MODEL_PATH=str(default_model_dir), BOOK=str(book), POSITIONS="5", CONTEXT_TOKENS="16",
               NEW_TOKENS="8", WINDOW="64", MASTER_PORT="29741", CUDA_VISIBLE_DEVICES="",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    results = {}
    for processes in ("1", "2"):
        out = tmp_path / f"eval{processes}"
        res = subprocess.run(["bash", str(FOLDER / "run_predict.sh")], capture_output=True, text=True, timeout=600,
                             env={**env, "NUM_GPUS": processes, "OUTPUT_DIR": str(out)})
        assert res.returncode == 0, res.stderr[-3000:]
        results[processes] = (json.loads((out / "metrics.json").read_text()),
                              (out / "continuations.jsonl").read_text(encoding="utf-8"))
        results[processes] += (res.stdout,)
    (one, one_text, _), (two, two_text, log) = results["1"], results["2"]
    assert "process 1 of 2" in log
    assert two["perplexity"]["tokens"] == one["perplexity"]["tokens"] > 64  # several windows, each token once
    assert two["perplexity"]["perplexity"] == pytest.approx(one["perplexity"]["perplexity"], rel=1e-5)
    assert two_text == one_text and two["rouge-chinese/char"] == one["rouge-chinese/char"]
    assert one["continuations"]["positions"] == 5
