"""Prediction (novelkit.evaluation.prediction and the predict.py entries) on the embedded default model and real CSL /
MSRA data: a run killed with -9 resumes to the same file as an uninterrupted one, submission mode, interactive
streaming."""

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from entry_scripts import run_script
from novelkit.errors import ConfigError, DataError
from novelkit.data.formats import Sample, to_sample
from novelkit.generation.batch import generate_responses
from novelkit.models.loading import write_base_fingerprint
from novelkit.evaluation.prediction import (PredictionLog, generation_settings, load_for_prediction, prediction_parser,
                                 interactive, predict_file, read_data, score_baselines, score_responses,
                                 baseline_verdict)
from novelkit.data.readers import iter_records

ROOT = Path(__file__).resolve().parents[1]
FULL_PREDICT = ROOT / "Baichuan-Finetune" / "predict.py"
QLORA_PREDICT = ROOT / "Baichuan-Finetune-QLora" / "predict.py"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def csl_dev(shared_data, tmp_path_factory):
    rows = [r.data for r, _ in zip(iter_records(shared_data / "csl" / "clge_val.tsv"), range(14))]
    return write_jsonl(tmp_path_factory.mktemp("csl") / "dev.json",
                       [{"instruction": "根据标题生成中文学位论文摘要：" + r["title"], "input": "", "output": r["text"][:80]}
                        for r in rows])


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    args = prediction_parser("test").parse_args(["--only_cpu"])
    return load_for_prediction(args)


def args_for(*argv):
    return prediction_parser("test").parse_args(["--only_cpu", *map(str, argv)])


def test_killed_run_resumes_to_the_uninterrupted_result(loaded, csl_dev, tmp_path, default_model_dir):
    model, tokenizer, template = loaded
    flags = ["--data", csl_dev, "--batch_size", 3, "--max_new_tokens", 12]
    whole = tmp_path / "whole"
    predict_file(model, tokenizer, template, args_for(*flags, "--output_dir", whole))

    # the same run in a separate process, killed with SIGKILL once some batches are on disk
    broken = tmp_path / "broken"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(FULL_PREDICT), "--model_path", str(default_model_dir), "--only_cpu",
                             *map(str, flags), "--output_dir", str(broken)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = broken / "predictions.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and len(target.read_text(encoding="utf-8").splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = target.read_text(encoding="utf-8")
    assert 3 <= len(done.splitlines()) < 14
    with target.open("a", encoding="utf-8") as f:  # and as if it died in the middle of writing a line
        f.write('{"instruction": "根据标题生成中文学位论文摘要：半截')

    metrics = predict_file(model, tokenizer, template, args_for(*flags, "--output_dir", broken))
    assert metrics["generated"] == 14 - len(done.splitlines())  # only what was missing
    assert target.read_text(encoding="utf-8") == (whole / "predictions.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(14))
    first = json.loads((whole / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k not in ("generated", "generation_seconds")} == \
        {k: v for k, v in first.items() if k not in ("generated", "generation_seconds")}
    for key in ("rouge-chinese/word", "rouge-chinese/char", "standard/word", "standard/char"):
        assert set(first[key]) == {"rouge-1", "rouge-2", "rouge-l"}
    assert first["table"].startswith("| metric | P | R | F |")


def test_reconcile_checks_every_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": f"问{i}", "label": f"答{i}"} for i in range(4)])
    records = list(iter_records(data))
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, records)
    log.append([log.row(2, "二"), log.row(0, "零")])
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(log.row(2, "again"), ensure_ascii=False) + "\n" + '{"input": "问')
    again = PredictionLog(path, records)
    assert {i: r["response"] for i, r in again.done.items()} == {2: "二", 0: "零"}  # duplicate and torn line dropped
    assert path.read_text(encoding="utf-8").count("\n") == 2 and path.read_text(encoding="utf-8").endswith("\n")

    other = write_jsonl(tmp_path / "other.jsonl", [{"input": f"别的{i}", "label": ""} for i in range(4)])
    with pytest.raises(DataError, match=r"predictions.jsonl:1: does not match record 2 .*other data"):
        PredictionLog(path, list(iter_records(other)))
    path.write_text("not json\n" + json.dumps(log.row(1, "一"), ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"predictions.jsonl:1: not a JSON line"):
        PredictionLog(path, records)


def test_shards_split_the_records_and_resume_on_any_number_of_processes(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": f"问{i}", "label": f"答{i}"} for i in range(10)])
    records = list(iter_records(data))
    path = tmp_path / "predictions.jsonl"
    first = PredictionLog(path, records)  # a one-process run killed after two records
    first.append([first.row(0, "r0"), first.row(5, "r5")])
    # then three processes, killed: each wrote some of its own records (i % 3 == rank) to its part, one torn
    logs = [PredictionLog(path, records, shard=(rank, 3)) for rank in range(3)]
    assert [[i for i in range(10) if log.mine(i) and i not in log.done] for log in logs] == [[3, 6, 9], [1, 4, 7],
                                                                                             [2, 8]]
    logs[1].append([logs[1].row(1, "r1"), logs[1].row(4, "r4")])
    logs[2].append([logs[2].row(2, "r2")])
    with (path.parent / "predictions.jsonl.parts" / "part-2.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"input": "问8", "la')
    # resumed on two: what any file holds is done, each record is one process's, nothing twice
    logs = [PredictionLog(path, records, shard=(rank, 2)) for rank in range(2)]
    todo = [[i for i in range(10) if log.mine(i) and i not in log.done] for log in logs]
    assert todo == [[6, 8], [3, 7, 9]]
    for log, indices in zip(logs, todo):
        log.append([log.row(i, f"r{i}") for i in indices])
    assert logs[0].finish() == [f"r{i}" for i in range(10)]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(10)) and not (path.parent / "predictions.jsonl.parts").exists()
    parted = PredictionLog(path, records, shard=(1, 2))  # a finished file: nothing left for anyone
    assert len(parted.done) == 10


def test_interactive_refuses_several_processes(monkeypatch, default_model_dir):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--interactive runs in one process: NUM_GPUS=1"):
        load_for_prediction(args_for("--interactive"))


def test_run_predict_on_two_processes_equals_one(csl_dev, tmp_path, default_model_dir):
    env = dict(os.environ, MODEL_PATH=str(default_model_dir), DATA=str(csl_dev), BATCH="3", MAX_NEW_TOKENS="12",
               MASTER_PORT="29731", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    outputs = {}
    for processes in ("1", "2"):
        out = tmp_path / f"p{processes}"
        proc = subprocess.run(["bash", str(ROOT / "Baichuan-Finetune" / "run_predict.sh"), "--only_cpu"],
                              env={**env, "NUM_GPUS": processes, "OUTPUT_DIR": str(out)}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[processes] = out
    assert "process 1 of 2: records i with i % 2 == 1" in proc.stdout
    assert (outputs["2"] / "predictions.jsonl").read_text(encoding="utf-8") == \
        (outputs["1"] / "predictions.jsonl").read_text(encoding="utf-8")
    one, two = (json.loads((outputs[n] / "metrics.json").read_text()) for n in ("1", "2"))
    assert two["generated"] == one["generated"] == 14
    assert two["rouge-chinese/char"] == one["rouge-chinese/char"]
    assert not (outputs["2"] / "predictions.jsonl.parts").exists()


def test_submission_mode(loaded, tmp_path, capsys):
    model, tokenizer, template = loaded
    test = write_jsonl(tmp_path / "test.json", [
        {"instruction": "根据标题生成中文学位论文摘要：超立方体网络的连通度", "input": "", "output": ""},
        {"instruction": "你现在是一个实体识别模型。", "input": "文本：郑振铎先生在北京。", "output": ""},
        {"instruction": "根据提示写一段小说正文。", "input": "山寺小和尚每晚听见钟楼上有人吹笛", "output": ""},
    ])
    submit = tmp_path / "submit.json"
    flags = ["--data", test, "--output_dir", tmp_path / "out", "--submit_file", submit, "--max_new_tokens", 6]
    predict_file(model, tokenizer, template, args_for(*flags))
    text = submit.read_text(encoding="utf-8")
    assert "超立方体网络" in text  # ensure_ascii=False: Chinese as is
    rows = [json.loads(line) for line in text.splitlines()]
    originals = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    assert [{**r, "output": ""} for r in rows] == originals  # order and fields kept
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [p["response"] for p in predictions]

    with pytest.raises(ConfigError, match=r"submit.json already exists; pass --overwrite"):
        predict_file(model, tokenizer, template, args_for(*flags))
    submit.write_text("old")
    metrics = predict_file(model, tokenizer, template, args_for(*flags, "--overwrite"))
    assert metrics["generated"] == 0 and metrics["scored"] == 0  # nothing to redo, nothing to score against
    assert submit.read_text(encoding="utf-8") == text


def test_scores_add_entity_f1_for_ner_references(shared_data):
    records, samples, fmt = read_data(shared_data / "msra_ner" / "eval.jsonl")
    assert fmt == "instruct"
    refs = [s.response for s in samples[:20]]
    hyps = refs[:10] + ["没有"] * 10
    scores = score_responses(hyps, refs)
    gold_second_half = sum(len([x for x in r.splitlines() if x != "没有"]) for r in refs[10:])
    assert scores["ner"]["precision"] == 1.0
    assert scores["ner"]["recall"] == pytest.approx(1 - gold_second_half / scores["ner"]["gold"])
    assert "ner" not in score_responses(["随便"], ["一段普通的摘要文字。"])


def test_interactive_mode_streams_with_the_seed_flags(default_model_dir, loaded, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("山寺小和尚\n\n"))
    code = run_script(QLORA_PREDICT, "--base_model", default_model_dir, "--tokenizer_path", default_model_dir,
                      "--interactive", "--with_prompt", "--only_cpu", "--max_new_tokens", 10)
    out = capsys.readouterr().out
    assert code == 0
    streamed = out.split("Response: ", 1)[1].split("Input: ", 1)[0].strip()
    model, tokenizer, template = loaded
    gen = generation_settings(model, args_for("--max_new_tokens", 10))
    expected = generate_responses(model, tokenizer, template, [Sample("山寺小和尚", "")], progress=False, **gen)[0]
    assert streamed == expected and streamed


def test_adapter_for_another_base_is_a_one_line_error(tmp_path, default_model_dir, capsys):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    get_peft_model(other, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    write_base_fingerprint(tmp_path / "adapter", other.config)
    code = run_script(QLORA_PREDICT, "--base_model", default_model_dir, "--lora_model", tmp_path / "adapter",
                      "--data_file", tmp_path / "none.json", "--only_cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: adapter {tmp_path / 'adapter'} was made for another base model")


def test_baselines_copy_the_document_not_the_instruction(shared_data):
    """lead-N copies the first N characters (N = the references' median length) of the abstract or news text inside
    the prompt, not the instruction before it; the values are ROUGE of those copies."""
    records = [r for r, _ in zip(iter_records(shared_data / "csl" / "clge_val.tsv"), range(9))]
    samples = [to_sample(r, "csl_abstract2title") for r in records]
    assert all(s.source in s.prompt and s.prompt != s.source for s in samples)
    refs = [s.response for s in samples]
    n = int(statistics.median(len(r) for r in refs))
    baselines = score_baselines(samples, refs)
    lead = score_responses([s.source[:n] for s in samples], refs)
    assert baselines[f"lead-{n}"]["rouge-chinese/char"] == lead["rouge-chinese/char"]
    assert 0 < baselines[f"lead-{n}"]["rouge-chinese/char"]["rouge-1"]["f"] < 1
    # the verdict: the references themselves beat copying; the lead-N copy itself does not
    assert "beats copying" in baseline_verdict({**score_responses(refs, refs), "baselines": baselines})
    assert "does NOT beat" in baseline_verdict({**lead, "baselines": baselines})
    assert score_baselines(samples, [""] * len(samples)) == {}  # nothing to score against (a test file)


def test_copy_bias_flags_reach_the_engine_and_copy_more(loaded, shared_data):
    """--encoder_repetition_penalty and --no_prompt_penalty go from the command line through generation_settings into
    the engine: the responses take more of the abstract's characters than greedy decoding's do."""
    model, tokenizer, template = loaded
    records = [r for r, _ in zip(iter_records(shared_data / "csl" / "clge_val.tsv"), range(6))]
    samples = [to_sample(r, "csl_abstract2title") for r in records]
    plain = generation_settings(model, args_for("--max_new_tokens", 16))
    biased = generation_settings(model, args_for("--max_new_tokens", 16, "--encoder_repetition_penalty", 2.0,
                                                 "--repetition_penalty", 1.3, "--no_prompt_penalty"))
    assert biased["encoder_repetition_penalty"] == 2.0 and biased["penalize_prompt"] is False
    assert "penalize_prompt" not in plain

    def copied(settings):
        responses = generate_responses(model, tokenizer, template, samples, progress=False, **settings)
        return sum(ch in s.source for r, s in zip(responses, samples) for ch in r) / sum(map(len, responses))

    assert copied(biased) > copied(plain) + 0.1


def test_minimum_bayes_risk_picks_the_candidate_closest_to_the_others():
    from novelkit.evaluation.prediction import choose_by_consensus

    assert choose_by_consensus(["abcd", "abce", "xyz", "abcf"]) == "abcd"  # the first of three equals
    assert choose_by_consensus(["", "标题一", "标题二", "另外的题"]) == "标题一"
    assert choose_by_consensus(["only"]) == "only"


def test_mbr_chooses_each_response_among_the_greedy_one_and_samples(loaded, csl_dev, tmp_path, monkeypatch):
    """--mbr 4: every record's candidates are its greedy response and 3 samples, and the response written is the
    one minimum Bayes risk chooses among them."""
    from novelkit.evaluation import prediction

    model, tokenizer, template = loaded
    flags = ["--data", csl_dev, "--batch_size", 4, "--max_new_tokens", 10]
    greedy = predict_file(model, tokenizer, template, args_for(*flags, "--output_dir", tmp_path / "greedy"))
    seen, consensus = [], prediction.choose_by_consensus

    def choose(candidates):
        seen.append(list(candidates))
        return consensus(candidates)

    monkeypatch.setattr(prediction, "choose_by_consensus", choose)
    chosen = predict_file(model, tokenizer, template,
                          args_for(*flags, "--mbr", 4, "--temperature", 1.5, "--output_dir", tmp_path / "mbr"))
    assert chosen["samples"] == greedy["samples"] == len(seen)
    plain = [json.loads(line)["response"] for line in open(tmp_path / "greedy" / "predictions.jsonl")]
    written = [json.loads(line)["response"] for line in open(tmp_path / "mbr" / "predictions.jsonl")]
    assert all(len(c) == 4 for c in seen)
    assert sorted(c[0] for c in seen) == sorted(plain)  # the first candidate is the greedy response
    assert any(len(set(c)) > 1 for c in seen)  # the samples differ
    assert sorted(written) == sorted(consensus(c) for c in seen)
    assert written != plain  # some record took a sample
    with pytest.raises(ConfigError, match="--mbr"):
        interactive(model, tokenizer, template, args_for("--interactive", "--mbr", 4))
