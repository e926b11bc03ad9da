"""The fine-tuning data step: the seeds' three tasks prepared from the raw files in ../shared/data, the checks on train
and dev files, and finding the checkpoint to resume from after a kill."""

import json
from pathlib import Path

import pytest

from entry_scripts import run_script
from novelkit.data.formats import CSL_TITLE2ABSTRACT_PROMPT, load_samples
from novelkit.data.tasks import opening, split_records, task_records
from novelkit.data.templates import get_template
from novelkit.errors import DataError
from novelkit.training.sft_training import DataArguments, last_complete_checkpoint, load_sft_data

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def prepare(task, raw, out, *extra):
    assert run_script(ROOT / "Baichuan-Finetune" / "prepare_data.py", task, "--raw", raw, "--output_dir", out,
                      *extra) == 0


def test_csl_title_to_abstract(shared_data, tmp_path):
    prepare("csl", shared_data / "csl" / "clge_val.tsv", tmp_path, "--dev", 50, "--test", 30)
    train, dev, test = (read_jsonl(tmp_path / f"{n}.json") for n in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (919, 50, 30)  # one title is in the file twice: kept once
    assert all(r["instruction"].startswith(CSL_TITLE2ABSTRACT_PROMPT) and r["input"] == "" and r["output"]
               for r in train + dev)
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] == "" for r in test)
    # the prompt is exactly what the raw TSV gives through the csl_title2abstract format
    raw = {s.prompt: s.response for s in load_samples(shared_data / "csl" / "clge_val.tsv")}
    assert all(raw[r["instruction"]] == r["output"] for r in train[:50] if "ICDIP2019" not in r["instruction"])
    assert len({r["instruction"] for r in train + dev + test}) == 999  # nothing shared between the splits


def test_msra_ner(shared_data, tmp_path):
    prepare("ner", shared_data / "msra_ner" / "eval.jsonl", tmp_path, "--dev", 20, "--test", 10, "--max_train", 100)
    train = read_jsonl(tmp_path / "train.json")
    assert len(train) == 100
    original = {json.loads(line)["query"]: json.loads(line) for line in
                (shared_data / "msra_ner" / "eval.jsonl").open(encoding="utf-8")}
    for r in train:
        o = original[r["input"]]
        assert (r["instruction"], r["output"]) == (o["instruct"], o["answer"])
    # same prompt text as the instruct format gives the raw record
    sample = load_samples(tmp_path / "train.json")[0]
    assert sample.prompt == train[0]["instruction"] + "\n" + train[0]["input"]


def test_novel_passages(shared_data):
    rows = task_records("novel", [shared_data / "novels" / "xiyouji.txt"], max_chars=800)
    assert len(rows) > 500
    assert all(400 <= len(r["output"]) <= 800 for r in rows)
    assert all(r["input"].startswith("《xiyouji》第") for r in rows)
    assert rows[0]["input"].endswith("开头：" + opening(rows[0]["output"]))
    assert rows[0]["output"].startswith(opening(rows[0]["output"]))
    text = (shared_data / "novels" / "xiyouji.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    assert all(r["output"] in text for r in rows[:50])  # passages are slices of the book
    with pytest.raises(Exception, match="too few"):
        split_records(rows[:5], 3, 2)


@pytest.fixture()
def files(tmp_path):
    alpaca = [{"instruction": "根据提示写一段小说正文。", "input": f"提示{i}", "output": "正文" * 5} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in alpaca))
    (tmp_path / "dev.jsonl").write_text(json.dumps({"instruct": "识别", "query": "北京", "answer": "北京_地名"},
                                                   ensure_ascii=False) + "\n")
    long = [{**alpaca[0], "output": "很长的回答。" * 200}, alpaca[1]]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long))
    return tmp_path


def test_dev_in_another_format_is_refused(files, default_tokenizer):
    args = DataArguments(data=str(files / "train.jsonl"), dev=str(files / "dev.jsonl"), max_length=64)
    with pytest.raises(DataError, match=r"dev.jsonl: dev file is in format 'instruct' but the training file .*"
                                        r"train.jsonl is in 'alpaca'"):
        load_sft_data(default_tokenizer, get_template("human_assistant"), args)


def test_response_longer_than_max_length_is_reported(files, default_tokenizer, capsys):
    args = DataArguments(data=str(files / "long.jsonl"), dev=str(files / "train.jsonl"), max_length=64)
    data = load_sft_data(default_tokenizer, get_template("human_assistant"), args)
    assert [len(r["input_ids"]) <= 64 for r in data.train] == [True, True] and len(data.dev) == 4
    err = capsys.readouterr().err
    assert f"warning: {files / 'long.jsonl'}:1: the sample is" in err
    assert "1 of 2 training samples lose the end of their response" in err and "MAX_LENGTH" in err


def test_resume_skips_a_checkpoint_the_kill_left_half_written(tmp_path, capsys):
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
    for step in (4, 8):  # the Trainer writes trainer_state.json last
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert "skipping" in capsys.readouterr().err
