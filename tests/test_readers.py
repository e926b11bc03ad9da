import codecs
import json

import pytest

from novelkit.data import readers
from novelkit.data.bookstream import stream_chapters
from novelkit.data.readers import Book, Record, detect_encoding, iter_records, read_books, read_text
from novelkit.errors import DataError


def reencode(src, dst, encoding, newline="\n"):
    """Copy a UTF-8 file to `dst` in another encoding and with other line ends."""
    text = src.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\n", newline)
    dst.write_bytes(text.encode(encoding))
    return dst


def write(path, content):
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def records_of(path, **kwargs):
    return [(r.data, r.line) for r in iter_records(path, **kwargs)]


def assert_data_error(excinfo, path, line, *words):
    message = str(excinfo.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "encoding, expected",
    [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gb18030", "gb18030"), ("gbk", "gb18030")],
)
def test_detect_encoding(tmp_path, encoding, expected):
    path = tmp_path / "a.txt"
    path.write_bytes("第一回 灵根育孕源流出\n话说天下大势。\n".encode(encoding))
    assert detect_encoding(path) == expected


@pytest.mark.parametrize("name", ["xiyouji", "hongloumeng"])
@pytest.mark.parametrize(
    "encoding, newline",
    [("gb18030", "\r\n"), ("utf-8-sig", "\r\n"), ("utf-8", "\n"), ("utf-8", "\r"), ("gb18030", "\r")],
)
def test_read_text_of_reencoded_novels_is_identical(shared_data, tmp_path, name, encoding, newline):
    original = shared_data / "novels" / f"{name}.txt"
    expected = read_text(original)
    assert "\r" not in expected and expected.count("\n") > 1000
    copy = reencode(original, tmp_path / f"{name}.txt", encoding, newline)
    assert read_text(copy) == expected


def test_gbk_copy_of_novel_reads_identically(shared_data, tmp_path):
    original = shared_data / "novels" / "hongloumeng.txt"  # every character of it is in GBK
    copy = reencode(original, tmp_path / "h.txt", "gbk", "\r\n")
    assert detect_encoding(copy) == "gb18030"
    assert read_text(copy) == read_text(original)


def test_character_split_at_the_sniff_boundary_is_decoded(tmp_path, monkeypatch):
    text = "甲乙丙丁戊己庚辛壬癸\n" * 50
    for encoding, expected in [("utf-8", "utf-8"), ("gb18030", "gb18030")]:
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(text.encode(encoding))
        for sniff in (7, 8, 9, 101):  # ends the sniff inside a 2- or 3-byte character
            monkeypatch.setattr(readers, "SNIFF_BYTES", sniff)
            assert detect_encoding(path) == expected
            assert read_text(path) == text


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("block", [2, 3, 1 << 20])  # small blocks split CRLF pairs while counting lines
def test_undecodable_byte_names_offset_and_line(tmp_path, monkeypatch, newline, block):
    monkeypatch.setattr(readers, "_BLOCK_BYTES", block)
    data = newline.join([b'{"text": "ok"}', b"", b'{"text": "\xff"}', b""])
    path = write(tmp_path / "bad.jsonl", data)
    offset = data.index(b"\xff")
    with pytest.raises(DataError) as excinfo:
        detect_encoding(path)
    assert_data_error(excinfo, path, 3, "0xff", f"offset {offset}", "UTF-8", "GB18030")


def test_undecodable_byte_after_the_sniff_is_found_while_streaming(tmp_path, monkeypatch):
    # More than one 8 KiB read of the text layer before the bad byte.
    lines = [json.dumps({"text": f"第{i}行"}, ensure_ascii=False) for i in range(2000)]
    data = "\n".join(lines).encode("utf-8") + b'\n{"text": "\xc3"}\n'
    path = write(tmp_path / "late.jsonl", data)
    offset = data.index(b"\xc3")
    monkeypatch.setattr(readers, "SNIFF_BYTES", 1024)
    stream = iter_records(path)
    assert next(stream).data == {"text": "第0行"}
    with pytest.raises(DataError) as excinfo:
        list(stream)
    assert_data_error(excinfo, path, 2001, "0xc3", f"offset {offset}", "UTF-8")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_with_bom(tmp_path, encoding):
    """Windows Notepad's "Unicode" (UTF-16 LE with a BOM) and the other byte orders and widths are read as text."""
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
           "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[encoding]
    novel = "第一章 开端\r\n他走进了雨里。\r\n第二章 归来\r\n雨停了。\r\n"
    path = write(tmp_path / "小说.txt", bom + novel.encode(encoding))
    assert read_text(path) == novel.replace("\r\n", "\n")
    assert [b.text for b in read_books(path)] == [novel.replace("\r\n", "\n")]
    parts = list(stream_chapters(path))
    assert [p.title for p in parts] == ["第一章 开端", "第二章 归来"]
    lines = '{"instruction": "续写", "output": "雨"}\r\n{"instruction": "问", "output": "答"}\n'
    records = list(iter_records(write(tmp_path / "a.jsonl", bom + lines.encode(encoding))))
    assert [(r.line, r.data["output"]) for r in records] == [(1, "雨"), (2, "答")]


def test_utf16_bad_sequence_names_its_line(tmp_path):
    """A lone surrogate on line 3 of a UTF-16 file: the error names line 3, counted in characters, not bytes."""
    data = codecs.BOM_UTF16_LE + '{"text": "一"}\n{"text": "二"}\n{"text": "'.encode("utf-16-le")
    data += b"\x00\xd8" + '"}\n'.encode("utf-16-le")  # U+D800 alone
    path = write(tmp_path / "a.jsonl", data)
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 3, "UTF-16")


# ---------------------------------------------------------------- JSON lines


def test_msra_jsonl_records(shared_data):
    records = list(iter_records(shared_data / "msra_ner" / "eval.jsonl"))
    assert len(records) == 1000  # 1000 lines, the last without a newline (the README says 999)
    assert [r.line for r in records] == list(range(1, 1001))
    assert set(records[0].data) == {"instruct", "query", "answer"}
    assert records[0].data["answer"] == "日_地名\n京_地名\n北京_地名"
    assert records[0].path == str(shared_data / "msra_ner" / "eval.jsonl")


@pytest.mark.parametrize(
    "encoding, newline", [("gb18030", "\r\n"), ("gbk", "\n"), ("utf-8-sig", "\r\n"), ("utf-8", "\r")]
)
def test_reencoded_jsonl_gives_identical_records(shared_data, tmp_path, encoding, newline):
    original = shared_data / "msra_ner" / "eval.jsonl"
    copy = reencode(original, tmp_path / "eval.jsonl", encoding, newline)
    assert records_of(copy) == records_of(original)


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    path = write(tmp_path / "a.jsonl", '\n{"text": "一"}\r\n  \r\n\r\n{"text": "二"}\n\n')
    assert records_of(path) == [({"text": "一"}, 2), ({"text": "二"}, 5)]


def test_records_are_streamed(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "一"}\n{"text": "二"}\nnot json\n')
    stream = iter_records(path)
    assert next(stream).data == {"text": "一"}
    assert next(stream).data == {"text": "二"}
    with pytest.raises(DataError):
        next(stream)


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"text": }', ["bad JSON", "Expecting value", "column 10"]),
        ('{"text": "a"', ["bad JSON", "column"]),
        ('["text", "a"]', ["expected a JSON object, got array"]),
        ('"just a string"', ["expected a JSON object, got string"]),
    ],
)
def test_bad_json_line(tmp_path, line, words):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 3, *words)


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.jsonl", ""),
        ("a.jsonl", "\n\n  \r\n"),
        ("a.tsv", ""),
        ("a.tsv", "\r\n\r\n"),
        ("a.json", ""),
        ("a.json", " [\n ]\n"),
    ],
)
def test_empty_file(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 1, "empty file")


def test_skip_bad_counts_and_warns(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", '{"n": 1}\n{"n": \n[2]\n{"n": 4}\n{oops}\n{"n": 6}\n')
    stream = iter_records(path, skip_bad=True)
    assert [(r.data["n"], r.line) for r in stream] == [(1, 1), (4, 4), (6, 6)]
    assert stream.skipped == 3
    assert str(stream.first_error).startswith(f"{path}:2: bad JSON")
    err = capsys.readouterr().err
    assert "skipped 3 bad record" in err and str(path) in err


def test_skip_bad_with_nothing_left_is_an_error(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", "[1]\n[2]\n")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path, skip_bad=True))
    assert_data_error(excinfo, path, 1, "empty file", "2 bad records skipped")


def test_no_warning_without_skips(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", '{"n": 1}\n')
    stream = iter_records(path, skip_bad=True)
    assert len(list(stream)) == 1 and stream.skipped == 0
    assert capsys.readouterr().err == ""


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "a.csv", "a,b\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        list(iter_records(path))


# ---------------------------------------------------------------- JSON arrays


def test_json_array_line_numbers(tmp_path):
    items = [{"instruction": "一", "output": "二"}, {"instruction": "三\n四", "output": ""}, {"text": "五"}]
    path = write(tmp_path / "a.json", json.dumps(items, ensure_ascii=False, indent=2))
    # indent=2: "[" on line 1, each object is "{", two fields, "}," = 4 lines
    assert records_of(path) == [(items[0], 2), (items[1], 6), (items[2], 10)]


def test_json_array_hand_laid_out(tmp_path):
    content = '\r\n  [ {"a": 1},\r\n\r\n{"a": 2}, {"a":\n 3}\n,\n{"a": 4}\n]\n'
    path = write(tmp_path / "a.json", content)
    assert records_of(path) == [({"a": 1}, 2), ({"a": 2}, 4), ({"a": 3}, 4), ({"a": 4}, 7)]


def test_json_array_in_gb18030_with_bom_less_crlf(shared_data, tmp_path):
    jsonl = shared_data / "msra_ner" / "eval.jsonl"
    data = [r.data for r in iter_records(jsonl)]
    path = tmp_path / "eval.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False, indent=1).replace("\n", "\r\n").encode("gb18030"))
    records = list(iter_records(path))
    assert [r.data for r in records] == data
    assert [r.line for r in records] == [2 + 5 * i for i in range(len(data))]


def test_json_array_non_object_element(tmp_path, capsys):
    path = write(tmp_path / "a.json", '[\n{"a": 1},\n"x",\n{"a": 2}\n]')
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 3, "expected a JSON object, got string")
    stream = iter_records(path, skip_bad=True)
    assert [(r.data, r.line) for r in stream] == [({"a": 1}, 2), ({"a": 2}, 4)]
    assert stream.skipped == 1


@pytest.mark.parametrize(
    "content, line, words",
    [
        ('[\n{"a": 1},\n{"a" 2}\n]', 3, ["bad JSON", "Expecting ':'"]),
        ('[\n{"a": 1}\n{"a": 2}\n]', 3, ["expected ',' or ']'"]),
        ('[\n{"a": 1},\n', 3, ["bad JSON", "Expecting value"]),
        ('[\n{"a": 1}\n', 3, ["not closed"]),
        ('[\n{"a": 1}\n]\n{"a": 2}\n', 4, ["extra data after the array"]),
    ],
)
def test_broken_json_array_is_fatal_even_with_skip_bad(tmp_path, content, line, words):
    path = write(tmp_path / "a.json", content)
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path, skip_bad=True))
    assert_data_error(excinfo, path, line, *words)


def test_json_file_with_json_lines(tmp_path):
    path = write(tmp_path / "a.json", '{"a": 1}\n{"a": 2}\n')
    assert records_of(path) == [({"a": 1}, 1), ({"a": 2}, 2)]
    bad = write(tmp_path / "b.json", '{\n  "a": 1\n}\n')
    with pytest.raises(DataError) as excinfo:
        list(iter_records(bad))
    assert_data_error(excinfo, bad, 1, "bad JSON", "read as JSON lines")


# ---------------------------------------------------------------- TSV


def test_csl_ts_dev_columns_detected(shared_data):
    path = shared_data / "csl" / "ts_dev.tsv"
    records = list(iter_records(path))
    assert len(records) == 1000
    first_line = path.read_text(encoding="utf-8").split("\n")[0].split("\t")
    assert records[0].data == dict(zip(["task", "abstract", "title"], first_line))
    assert records[0].data["task"] == "to title"
    assert records[-1].line == 1000


@pytest.mark.parametrize("name", ["csl/clge_val.tsv", "lcsts/val.tsv"])
def test_two_column_tsv_is_title_text(shared_data, name):
    records = list(iter_records(shared_data / name))
    assert len(records) == 1000
    assert all(set(r.data) == {"title", "text"} for r in records)


@pytest.mark.parametrize("name", ["csl/ts_dev.tsv", "lcsts/train.tsv"])
@pytest.mark.parametrize("encoding, newline", [("gb18030", "\r\n"), ("utf-8-sig", "\n")])
def test_reencoded_tsv_gives_identical_records(shared_data, tmp_path, name, encoding, newline):
    original = shared_data / name
    copy = reencode(original, tmp_path / original.name, encoding, newline)
    assert records_of(copy) == records_of(original)


def test_tsv_wrong_column_count(tmp_path):
    path = write(tmp_path / "a.tsv", "标题\t正文\n标题二\t正文\t多余\n")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 2, "expected 2 columns, got 3")
    stream = iter_records(path, skip_bad=True)
    assert [r.data for r in stream] == [{"title": "标题", "text": "正文"}]
    assert stream.skipped == 1


def test_tsv_columns_needed_for_other_shapes(tmp_path):
    path = write(tmp_path / "a.tsv", "\n一\t二\t三\t四\n")
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path))
    assert_data_error(excinfo, path, 2, "4-column", "tsv_columns")
    records = list(iter_records(path, tsv_columns=["a", "b", "c", "d"]))
    assert [(r.data, r.line) for r in records] == [({"a": "一", "b": "二", "c": "三", "d": "四"}, 2)]


def test_tsv_columns_override_detection(tmp_path):
    path = write(tmp_path / "a.tsv", "摘要\t标题\n")
    assert records_of(path, tsv_columns=["abstract", "title"]) == [({"abstract": "摘要", "title": "标题"}, 1)]
    with pytest.raises(DataError) as excinfo:
        list(iter_records(path, tsv_columns=["a", "b", "c"]))
    assert_data_error(excinfo, path, 1, "expected 3 columns, got 2")


# ---------------------------------------------------------------- books


def test_read_books_file_and_folder(shared_data, tmp_path):
    novels = shared_data / "novels"
    books = read_books(novels)
    assert [b.name for b in books] == ["hongloumeng", "shuihuzhuan", "xiyouji"]
    assert books[2] == Book("xiyouji", read_text(novels / "xiyouji.txt"), str(novels / "xiyouji.txt"))
    assert read_books(novels / "xiyouji.txt") == [books[2]]


def test_read_books_folder_is_recursive_sorted_and_decodes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.txt").write_bytes("第一章 开始\r\n正文。\r\n".encode("gb18030"))
    (tmp_path / "a.txt").write_bytes("甲".encode("utf-8-sig"))
    (tmp_path / "notes.md").write_text("ignored")
    books = read_books(tmp_path)
    assert [(b.name, b.text) for b in books] == [("a", "甲"), ("c", "第一章 开始\n正文。\n")]


def test_read_books_jsonl(tmp_path):
    path = write(tmp_path / "books.jsonl", '{"name": "甲", "text": "一"}\n{"text": "二"}\n')
    assert read_books(path) == [Book("甲", "一", str(path)), Book("books-2", "二", str(path))]


@pytest.mark.parametrize(
    "line, words",
    [('{"name": "甲"}', ["missing field 'text'"]), ('{"text": 3}', ["field 'text' must be a string"])],
)
def test_read_books_bad_record(tmp_path, line, words):
    path = write(tmp_path / "books.jsonl", '{"text": "一"}\n' + line + "\n")
    with pytest.raises(DataError) as excinfo:
        read_books(path)
    assert_data_error(excinfo, path, 2, *words)


def test_read_books_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="no .txt files"):
        read_books(tmp_path)
    path = write(tmp_path / "empty.txt", "\r\n")
    with pytest.raises(DataError) as excinfo:
        read_books(path)
    assert_data_error(excinfo, path, 1, "empty file")


def test_record_is_a_plain_dataclass():
    assert Record({"a": 1}, "p", 3) == Record(data={"a": 1}, path="p", line=3)
