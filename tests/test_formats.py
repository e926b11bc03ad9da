import json

import pytest

from novelkit.data.formats import FORMATS, Sample, detect_format, load_samples, to_sample
from novelkit.data.readers import Record, iter_records
from novelkit.errors import DataError

PATH = "data/train.jsonl"


def record(data, path=PATH, line=7):
    return Record(data, path, line)


def meta(**extra):
    return {"path": PATH, "line": 7, **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_error_at(excinfo, path, line, *words):
    message = str(excinfo.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- each format


@pytest.mark.parametrize(
    "fmt, data, expected",
    [
        ("text", {"text": "正文"}, Sample("", "正文", meta=meta())),
        ("novel", {"name": "西游记", "text": "话说"}, Sample("", "话说", meta=meta(name="西游记"))),
        (
            "alpaca",
            {"instruction": "翻译", "input": "你好", "output": "hello"},
            Sample("翻译\n你好", "hello", meta=meta(source="你好")),
        ),
        ("alpaca", {"instruction": "写诗", "input": "", "output": "床前明月光"}, Sample("写诗", "床前明月光", meta=meta())),
        ("alpaca", {"instruction": "写诗", "output": "床前"}, Sample("写诗", "床前", meta=meta())),
        (
            "alpaca",
            {"instruction": "再来", "input": "", "output": "好", "system": "你是诗人", "history": [["写诗", "床前"], ["续", "明月"]]},
            Sample("再来", "好", system="你是诗人", history=[("写诗", "床前"), ("续", "明月")], meta=meta()),
        ),
        ("alpaca", {"instruction": "测试集", "input": "", "output": ""}, Sample("测试集", "", meta=meta())),
        (
            "instruct",
            {"instruct": "提取实体。", "query": "文本：北京", "answer": "北京_地名"},
            Sample("提取实体。\n文本：北京", "北京_地名", meta=meta()),
        ),
        ("input_label", {"input": "标题", "label": "摘要"}, Sample("标题", "摘要", meta=meta())),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "system", "value": "你是助手"},
                    {"from": "human", "value": "问一"},
                    {"from": "gpt", "value": "答一"},
                    {"from": "user", "value": "问二"},
                    {"from": "assistant", "value": "答二"},
                ]
            },
            Sample("问二", "答二", system="你是助手", history=[("问一", "答一")], meta=meta()),
        ),
        (
            "sharegpt",
            {"system": "顶层系统", "conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]},
            Sample("问", "答", system="顶层系统", meta=meta()),
        ),
        (
            "openai",
            {
                "messages": [
                    {"role": "user", "content": "问一"},
                    {"role": "assistant", "content": "答一"},
                    {"role": "user", "content": "问二"},
                    {"role": "assistant", "content": "答二"},
                ]
            },
            Sample("问二", "答二", history=[("问一", "答一")], meta=meta()),
        ),
        (
            "openai",
            {
                "messages": [
                    {"role": "system", "content": "系统"},
                    {"role": "user", "content": "问"},
                    {"role": "assistant", "content": "答"},
                ]
            },
            Sample("问", "答", system="系统", meta=meta()),
        ),
        (
            "csl_title2abstract",
            {"title": "论文题目", "text": "摘要内容"},
            Sample("根据标题生成中文学位论文摘要：论文题目", "摘要内容", meta=meta(source="论文题目")),
        ),
        (
            "csl_title2abstract",
            {"task": "to title", "abstract": "摘要内容", "title": "论文题目"},
            Sample("根据标题生成中文学位论文摘要：论文题目", "摘要内容", meta=meta(source="论文题目")),
        ),
        (
            "csl_abstract2title",
            {"task": "to title", "abstract": "摘要内容", "title": "论文题目"},
            Sample("为下面的论文摘要写一个标题：摘要内容", "论文题目", meta=meta(source="摘要内容")),
        ),
        (
            "csl_abstract2title",
            {"title": "论文题目", "text": "摘要内容"},
            Sample("为下面的论文摘要写一个标题：摘要内容", "论文题目", meta=meta(source="摘要内容")),
        ),
        ("lcsts", {"title": "标题", "text": "新闻正文"}, Sample("为下面的新闻写一个标题：新闻正文", "标题",
                                                                 meta=meta(source="新闻正文"))),
    ],
)
def test_to_sample(fmt, data, expected):
    assert to_sample(record(data), fmt) == expected


def test_registry_names():
    assert sorted(FORMATS) == sorted(
        ["text", "novel", "alpaca", "instruct", "input_label", "sharegpt", "openai",
         "csl_title2abstract", "csl_abstract2title", "lcsts"]
    )


def test_unknown_format_name():
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        to_sample(record({"text": "x"}), "chatml")


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "fmt, data, words",
    [
        ("alpaca", {"instruction": "a", "input": ""}, ["missing field 'output'"]),
        ("alpaca", {"instruction": "a", "output": 3}, ["field 'output' must be a string, got a number"]),
        ("alpaca", {"instruction": ["a"], "output": "b"}, ["field 'instruction' must be a string, got a list"]),
        ("alpaca", {"instruction": "", "input": "", "output": ""}, ["empty sample"]),
        ("alpaca", {"instruction": "a", "output": "b", "history": [["q"]]}, ["field 'history' item 0"]),
        ("alpaca", {"instruction": "a", "output": "b", "history": "q"}, ["field 'history' must be a list"]),
        ("text", {"text": "  \n"}, ["empty sample"]),
        ("novel", {"text": "x"}, ["missing field 'name'"]),
        ("instruct", {"instruct": "a", "answer": "b"}, ["missing field 'query'"]),
        ("input_label", {"input": "a", "label": None}, ["field 'label' must be a string, got null"]),
        ("lcsts", {"title": "a"}, ["missing field 'text'"]),
        ("csl_abstract2title", {"title": "a"}, ["missing field 'abstract'"]),
        ("csl_title2abstract", {"abstract": "a"}, ["missing field 'title'"]),
        ("sharegpt", {"conversations": {"from": "human"}}, ["field 'conversations' must be a list, got an object"]),
        ("sharegpt", {"dialog": []}, ["missing field 'conversations'"]),
        ("sharegpt", {"conversations": []}, ["field 'conversations' has no user/assistant turns"]),
        ("sharegpt", {"conversations": ["hi"]}, ["conversations[0]: expected an object"]),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            ["conversations[1]: unknown from 'bot'"],
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
            ["conversations[1]: missing field 'value'"],
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
            ["conversations[1]: expected an assistant turn, got a user turn"],
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                    {"from": "human", "value": "q2"},
                ]
            },
            ["conversations[2]: the conversation must end with an assistant turn"],
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
            ["conversations[1]: expected an assistant turn, got a system turn"],
        ),
        (
            "openai",
            {"messages": [{"role": "assistant", "content": "a"}]},
            ["messages[0]: expected a user turn, got an assistant turn"],
        ),
        (
            "openai",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
            ["messages[0]: field 'content' must be a string, got a list"],
        ),
        ("openai", {"messages": [{"role": "human", "content": "q"}]}, ["messages[0]: unknown role 'human'"]),
        (
            "openai",
            {"messages": [{"role": "system", "content": "s"}]},
            ["field 'messages' has no user/assistant turns"],
        ),
    ],
)
def test_bad_record_names_the_field(fmt, data, words):
    with pytest.raises(DataError) as excinfo:
        to_sample(record(data), fmt)
    assert_error_at(excinfo, PATH, 7, *words)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "data, path, expected",
    [
        ({"text": "x"}, PATH, "text"),
        ({"text": "x", "source": "web"}, PATH, "text"),
        ({"name": "n", "text": "x"}, PATH, "novel"),
        ({"instruction": "a", "input": "", "output": "b"}, PATH, "alpaca"),
        ({"instruction": "a", "output": "b", "history": []}, PATH, "alpaca"),
        ({"instruct": "a", "query": "q", "answer": "b"}, PATH, "instruct"),
        ({"input": "a", "label": "b"}, PATH, "input_label"),
        ({"conversations": []}, PATH, "sharegpt"),
        ({"messages": []}, PATH, "openai"),
        ({"task": "to title", "abstract": "a", "title": "t"}, "x/ts_dev.tsv", "csl_abstract2title"),
        ({"title": "t", "abstract": "a"}, PATH, "csl_title2abstract"),
        ({"title": "t", "text": "a"}, "data/csl/val.tsv", "csl_title2abstract"),
        ({"title": "t", "text": "a"}, "data/CSL_val.tsv", "csl_title2abstract"),
        ({"title": "t", "text": "a"}, "data/lcsts/val.tsv", "lcsts"),
        ({"title": "t", "text": "a"}, "data/news.tsv", "lcsts"),
    ],
)
def test_detect_format(data, path, expected):
    assert detect_format(record(data, path)) == expected


def test_detect_format_unknown_shape_lists_fields_and_formats():
    with pytest.raises(DataError) as excinfo:
        detect_format(record({"question": "q", "reply": "r"}))
    assert_error_at(excinfo, PATH, 7, "['question', 'reply']", "alpaca", "sharegpt", "openai", "lcsts", "--format")


@pytest.mark.parametrize(
    "name, fmt, count",
    [
        ("csl/ts_dev.tsv", "csl_abstract2title", 1000),
        ("csl/clge_val.tsv", "csl_title2abstract", 1000),
        ("lcsts/val.tsv", "lcsts", 1000),
        ("lcsts/train.tsv", "lcsts", 8666),
        ("msra_ner/eval.jsonl", "instruct", 1000),
    ],
)
def test_real_files_are_detected(shared_data, name, fmt, count):
    path = shared_data / name
    samples = load_samples(path)
    assert samples.format == fmt and len(samples) == count and samples.skipped == 0
    first = next(iter(iter_records(path)))
    assert samples[0] == to_sample(first, fmt)
    assert (samples[0].meta["path"], samples[0].meta["line"]) == (str(path), 1)


def test_real_csl_sample_contents(shared_data):
    path = shared_data / "csl" / "ts_dev.tsv"
    task, abstract, title = path.read_text(encoding="utf-8").split("\n")[0].split("\t")
    sample = load_samples(path)[0]
    assert (sample.prompt, sample.response) == ("为下面的论文摘要写一个标题：" + abstract, title)
    sample = load_samples(path, "csl_title2abstract")[0]
    assert (sample.prompt, sample.response) == ("根据标题生成中文学位论文摘要：" + title, abstract)


def test_format_override_on_real_lcsts(shared_data):
    samples = load_samples(shared_data / "lcsts" / "val.tsv", "csl_title2abstract")
    assert samples.format == "csl_title2abstract"
    assert samples[0].prompt.startswith("根据标题生成中文学位论文摘要：")


def test_reencoded_real_file_gives_the_same_samples(shared_data, tmp_path):
    original = shared_data / "msra_ner" / "eval.jsonl"
    copy = tmp_path / "eval.jsonl"
    copy.write_bytes(original.read_text(encoding="utf-8").replace("\n", "\r\n").encode("gb18030"))
    strip = lambda samples: [(s.prompt, s.response, s.meta["line"]) for s in samples]  # noqa: E731
    assert strip(load_samples(copy)) == strip(load_samples(original))


# ---------------------------------------------------------------- load_samples


def test_every_record_must_fit_the_first_ones_format(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human", "value": "q"}]}],
    )
    with pytest.raises(DataError) as excinfo:
        load_samples(path)
    assert_error_at(excinfo, path, 2, "missing field 'instruction'")


def test_unknown_first_record_is_fatal_even_with_skip_bad(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": "a"}, {"text": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_samples(path, skip_bad=True)
    assert_error_at(excinfo, path, 1, "cannot tell the format")


def test_skip_bad_counts_reader_and_format_errors(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"instruction": "一", "output": "1"}\n'
        "not json\n"
        '{"instruction": "二"}\n'
        '{"instruction": "三", "output": "3"}\n'
        '{"instruction": "", "output": ""}\n',
        encoding="utf-8",
    )
    samples = load_samples(path, skip_bad=True)
    assert [(s.prompt, s.meta["line"]) for s in samples] == [("一", 1), ("三", 4)]
    assert samples.skipped == 3
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 3 bad record" in err and f"{path}:2: bad JSON" in err
    with pytest.raises(DataError) as excinfo:
        load_samples(path)
    assert_error_at(excinfo, path, 2, "bad JSON")


def test_skip_bad_with_nothing_usable_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a"}, {"instruction": "b"}])
    with pytest.raises(DataError, match="no usable records"):
        load_samples(path, "alpaca", skip_bad=True)


def test_json_array_and_tsv_columns_pass_through(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"input": "题", "label": "答"}\n]\n', encoding="utf-8")
    assert load_samples(array) == [Sample("题", "答", meta={"path": str(array), "line": 2})]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("问\t答\t多\n", encoding="utf-8")
    samples = load_samples(tsv, tsv_columns=["input", "label", "extra"])
    assert samples.format == "input_label" and samples[0].prompt == "问"


def test_load_samples_rejects_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="unknown format"):
        load_samples(path, "nope")
