"""Baichuan-Analysis data report on real files: token counts, truncation shares, problems, plots, bounded memory."""

import json
import math
import os
import runpy
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.analysis_scale import run_with_peak_rss, write_corpus
from novelkit.analysis.plots import curves, histogram
from novelkit.analysis.stats import DuplicateFinder, Fingerprint, LengthStats
from novelkit.data.bookstream import stream_chapters
from novelkit.data.chunking import split_chapters
from novelkit.data.features import encode_sft
from novelkit.data.formats import load_samples
from novelkit.data.readers import read_text
from novelkit.data.templates import encode_sample, get_template
from novelkit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "Baichuan-Analysis" / "analyze_data.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def analyze(out_dir, *args):
    """Run analyze_data.py in this process (as `python analyze_data.py ...` would) and return its report.json."""
    argv = sys.argv
    sys.argv = [str(SCRIPT), *map(str, args), "--output_dir", str(out_dir)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking it is one."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def png_description(path) -> str:
    """The title, axis labels and line names save_figure writes into the PNG's metadata."""
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a complete, uncorrupted PNG
        return image.text["Description"]


def nearest_rank(values, q):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------- building blocks


def test_length_stats_are_exact_percentiles():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 3000, size=5000).tolist()
    stats = LengthStats()
    for v in values:
        stats.add(v)
    for q in (50, 90, 95, 99):
        assert stats.percentile(q) == int(np.percentile(values, q, method="inverted_cdf")) == nearest_rank(values, q)
    assert stats.summary()["max"] == max(values) and stats.total == sum(values)
    assert stats.share_over(1000) == sum(v > 1000 for v in values) / len(values)


def test_duplicate_finder_reports_repeats_with_their_first():
    finder = DuplicateFinder()
    texts = ["甲", "乙", "甲", "丙", "乙", "甲"]
    for line, text in enumerate(texts, 1):
        finder.add(Fingerprint.of(text), line)
    assert finder.duplicates() == (3, [(1, 3), (2, 5), (1, 6)])
    spaced, plain = Fingerprint(ignore_whitespace=True), Fingerprint(ignore_whitespace=True)
    for piece in ("第一段\n\n", "　　第二段"):
        spaced.update(piece)
    plain.update("第一段第二段")
    assert spaced.value() == plain.value() and Fingerprint(ignore_whitespace=True).empty


@pytest.mark.parametrize("max_chars", [300, 5000, 1 << 20])
def test_streamed_chapters_join_to_split_chapters(shared_data, max_chars):
    """Read in blocks, a chapter longer than max_chars comes in parts; joined, they are split_chapters' chapters."""
    path = shared_data / "novels" / "hongloumeng.txt"
    expected = [(c.title, c.text) for c in split_chapters(read_text(path))]
    chapters = {}
    for part in stream_chapters(path, max_chars=max_chars):
        assert len(part.text) < 3 * max_chars  # parts are bounded: memory does not grow with the chapter
        title, text = chapters.get(part.chapter, (part.title, ""))
        chapters[part.chapter] = (title, text + part.text)
    assert [chapters[i] for i in range(len(chapters))] == expected


def test_streamed_chapters_keep_a_preface_and_empty_chapters(tmp_path):
    text = "序：作者的话。\n\n第一章 开始\n正文一。\n第二章 空章\n第三章 结束\n正文三。"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    for max_chars in (8, 1000):  # above the longest line: no line is cut
        got = {}
        for part in stream_chapters(path, max_chars=max_chars):
            got[part.chapter] = (part.title, got.get(part.chapter, ("", ""))[1] + part.text)
        assert list(got.values()) == [(c.title, c.text) for c in split_chapters(text)]
    blank_preface = tmp_path / "blank.txt"
    blank_preface.write_text("\n\n第一章 开始\n正文。\n", encoding="utf-8")
    assert [p.chapter for p in stream_chapters(blank_preface)] == [0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        list(stream_chapters(tmp_path / "empty"))


def test_plots_are_figures_with_the_expected_axes(tmp_path):
    from novelkit.analysis.plots import save_figure

    fig = histogram({10: 3, 12: 5, 40: 1}, "Tokens per sample: prompt", "tokens", "samples", markers={"max": 32})
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Tokens per sample: prompt", "tokens", "samples")
    assert sum(p.get_height() for p in ax.patches) == 9  # every sample is in a bar
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [32]
    fig = curves({"a": ([1, 2, 3], [3.0, 2.0, 1.5]), "b": ([1, 2], [3.1, 2.5])}, "Training loss", "step", "loss")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["a", "b"]
    save_figure(fig, tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (700, 400)


# ---------------------------------------------------------------- the report


def test_sample_token_counts_equal_the_tokenizers_own(shared_data, tmp_path, default_tokenizer):
    path = shared_data / "lcsts" / "val.tsv"
    report = analyze(tmp_path, "--data", path, "--max_lengths", "64,128,256")
    samples = load_samples(path)
    template = get_template(report["template"])
    tok = default_tokenizer
    expected = {
        "prompt_tokens": [len(tok.encode(s.prompt, add_special_tokens=False)) for s in samples],
        "response_tokens": [len(tok.encode(s.response, add_special_tokens=False)) for s in samples],
        "sample_tokens": [sum(len(ids) for ids, _ in encode_sample(tok, template, s)) for s in samples],
        "prompt_chars": [len(s.prompt) for s in samples],
    }
    assert report["samples"] == len(samples) == 1000 and report["format"] == "lcsts"
    for name, values in expected.items():
        got = report["lengths"][name]
        assert (got["count"], got["total"], got["min"], got["max"]) == (len(values), sum(values), min(values),
                                                                         max(values)), name
        assert [got[f"p{q}"] for q in (50, 90, 95, 99)] == [nearest_rank(values, q) for q in (50, 90, 95, 99)]
    for length, share in report["truncated_share"].items():
        assert share == sum(v > int(length) for v in expected["sample_tokens"]) / len(samples)
    for name, title in (("prompt_tokens", "prompt"), ("response_tokens", "response"),
                        ("sample_tokens", "whole sample (template)")):
        assert png_size(tmp_path / f"{name}.png") == (700, 400)
        assert png_description(tmp_path / f"{name}.png").startswith(
            f"title: Tokens per sample: {title}; x: tokens; y: samples")
        assert f"![{name}.png]({name}.png)" in (tmp_path / "report.md").read_text(encoding="utf-8")
    best = report["recommended_max_length"]
    assert png_description(tmp_path / "sample_tokens.png").endswith(f"lines: recommended MAX_LENGTH {best}")


def test_truncation_shares_on_hand_made_samples(tmp_path, default_tokenizer):
    """Digits are one token each (split_digits), so the lengths are known by construction: under the plain template
    a sample is prompt + response + EOS = 5 + (10i - 6) + 1 = 10i tokens, i = 1..10."""
    assert len(default_tokenizer.encode("1234567890", add_special_tokens=False)) == 10, "digits must be split"
    rows = [{"instruction": "12345", "input": "", "output": "7" * (10 * i - 6)} for i in range(1, 11)]
    data = write_jsonl(tmp_path / "made.jsonl", rows)
    report = analyze(tmp_path / "out", "--data", data, "--template", "plain", "--max_lengths", "30,50,99,100",
                     "--max_truncated", "0.1")
    assert report["lengths"]["sample_tokens"]["total"] == sum(10 * i for i in range(1, 11))
    assert report["truncated_share"] == {"30": 0.7, "50": 0.5, "99": 0.1, "100": 0.0}
    assert report["recommended_max_length"] == 99
    # the shares are what fine-tuning's encode_sft truncates
    samples = load_samples(data)
    for length, share in report["truncated_share"].items():
        cut = [encode_sft(default_tokenizer, get_template("plain"), s, int(length)).truncated for s in samples]
        assert sum(cut) / len(samples) == share


def test_empty_fields_duplicates_bad_records_and_mojibake_are_reported(tmp_path, default_model_dir):
    rows = [
        {"instruction": "写一句", "output": "山高月小。"},
        {"instruction": "写一句", "output": "水落石出。"},
        {"instruction": "写一句", "output": "山高月小。"},  # line 3 repeats line 1
        {"instruction": "写一句", "output": ""},
        {"instruction": "乱码", "output": "锟斤拷锟斤拷\ufffd"},
        '{"instruction": "broken"\n',
        {"instruction": "no output"},
    ]
    report = analyze(tmp_path, "--data", write_jsonl(tmp_path / "bad.jsonl", rows))
    assert report["samples"] == 5 and report["bad_records"] == 2
    assert report["first_bad_record"].startswith(f"{tmp_path / 'bad.jsonl'}:6: bad JSON")
    assert report["duplicates"] == 1 and report["duplicate_examples"] == [{"line": 3, "same_as_line": 1}]
    assert report["empty_fields"] == {"response": 1}
    assert report["encoding_problems"] == {"replacement_chars": 1, "mojibake_kunjinkao": 2}
    assert report["encoding_problem_lines"] == [5]


def test_novel_folder_report_matches_split_chapters_and_tokenizer(shared_data, tmp_path, default_tokenizer):
    """A GB18030 + CRLF copy of a real novel with one undecodable byte, a UTF-8 book and its duplicate."""
    books = tmp_path / "books"
    (books / "b").mkdir(parents=True)
    raw = read_text(shared_data / "novels" / "xiyouji.txt").replace("\n", "\r\n").encode("gb18030")
    middle = raw.index("。".encode("gb18030"), len(raw) // 2)
    raw = raw[:middle] + b"\xff" + raw[middle:]  # invalid in GB18030 and in UTF-8: the file is still analysed
    (books / "a.txt").write_bytes(raw)
    small = ROOT / "data_examples" / "novels" / "qingyun_ji.txt"
    for name in ("qingyun_ji.txt", "qingyun_copy.txt"):
        (books / "b" / name).write_text(small.read_text(encoding="utf-8"), encoding="utf-8")
    report = analyze(tmp_path / "out", "--data", books)

    chapters = {"a": split_chapters(raw.decode("gb18030", "replace").replace("\r\n", "\n")),
                "qingyun_copy": split_chapters(read_text(small)), "qingyun_ji": split_chapters(read_text(small))}
    per_book = {b["name"]: b for b in report["per_book"]}
    assert list(per_book) == ["a", "qingyun_copy", "qingyun_ji"]  # files in sorted order, folders included
    assert per_book["a"]["encoding"] == "gb18030" and per_book["qingyun_ji"]["encoding"] == "utf-8"
    for name, expected in chapters.items():
        assert per_book[name]["chapters"] == len(expected)
        assert per_book[name]["chars"] == sum(len(c.text) for c in expected)
        tokens = sum(len(default_tokenizer.encode(c.text, add_special_tokens=False)) for c in expected)
        assert per_book[name]["tokens_counted"] == tokens
    assert report["chapters"] == sum(map(len, chapters.values()))
    assert report["duplicate_chapters"] == len(chapters["qingyun_ji"])
    assert report["encoding_problems"] == {"replacement_chars": 1}
    lengths = [len(c.text) for cs in chapters.values() for c in cs]
    assert [report["chapter_chars"][f"p{q}"] for q in (50, 90, 99)] == [nearest_rank(lengths, q) for q in (50, 90, 99)]
    assert png_description(tmp_path / "out" / "chapter_tokens.png") == \
        f"title: tokens per chapter ({report['chapters']} chapters); x: tokens; y: chapters"


def test_large_corpus_is_analysed_in_bounded_memory(tmp_path, default_model_dir):
    """A 64 MiB single-file corpus needs about the same peak RSS as a 2 MiB one (reading it whole would add over
    100 MiB: 64 MiB of bytes, ~42 MiB of decoded text). The 1 GiB run is bench/analysis_scale.py."""
    sizes = (2, 64)
    chapters = {mb: write_corpus(tmp_path / f"corpus{mb}.txt", mb << 20) for mb in sizes}

    def run(mb):  # both at once: each process measures its own peak
        return run_with_peak_rss(SCRIPT, "--data", tmp_path / f"corpus{mb}.txt", "--token_every", "100",
                                 "--output_dir", tmp_path / f"report{mb}", env=dict(os.environ))
    with ThreadPoolExecutor(len(sizes)) as pool:
        results = dict(zip(sizes, pool.map(run, sizes)))
    for mb, (out, _) in results.items():
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads((tmp_path / f"report{mb}" / "report.json").read_text(encoding="utf-8"))
        assert report["chapters"] == chapters[mb] and report["books"] == 1
    peaks = {mb: peak for mb, (_, peak) in results.items()}
    assert peaks[64] - peaks[2] < 32 << 20, {mb: peak >> 20 for mb, peak in peaks.items()}


def test_bad_input_is_one_line_error(tmp_path, capsys, default_model_dir):
    with pytest.raises(SystemExit) as exit_info:
        analyze(tmp_path, "--data", tmp_path / "missing.jsonl")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: file not found"
