import random
import re

import pytest

from novelkit.data.chunking import Chapter, Chunk, chunk_book, chunk_text, split_chapters
from novelkit.data.readers import read_text

NOVELS = ["hongloumeng", "shuihuzhuan", "xiyouji"]
SENTENCE_FINAL = set("。！？!?…．”’」』）)\"'")


def squeeze(text: str) -> str:
    return re.sub(r"\s", "", text)


def assert_chunks_cover(chunks: list[str], text: str, max_chars: int):
    assert all(chunk and chunk == chunk.strip() and len(chunk) <= max_chars for chunk in chunks)
    assert squeeze("".join(chunks)) == squeeze(text)


def ends_sentence_or_line(book: str, chunk: Chunk) -> bool:
    after = book[chunk.start + len(chunk.text) :]
    return chunk.text[-1] in SENTENCE_FINAL or re.match(r"[ \t\u3000]*(\n|$)", after) is not None


def assert_book_chunks_are_right(book: str, chunks: list[Chunk], max_chars: int):
    """Chunks are in-order slices of the book; per chapter they hold exactly the chapter's non-space text."""
    chapters = split_chapters(book)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for chunk in chunks:
        assert book[chunk.start : chunk.start + len(chunk.text)] == chunk.text
        assert chunk.chapter_title == chapters[chunk.chapter_index].title
    for index, chapter in enumerate(chapters):
        texts = [c.text for c in chunks if c.chapter_index == index]
        assert_chunks_cover(texts, chapter.text, max_chars)


# ---------------------------------------------------------------- chapters


BOOK = (
    "书名\n\n"
    "第一章 开端\n　　正文一。\n"
    "  第12章：转折\n正文二。\n"
    "\u3000第一百二十回　大结局\n正文三。\n"
    "第三卷\n"
    "第四回中既将薛家母子在荣府内寄居等事略已表明，此回则暂不能写矣．\n"
    "第一回合，两人战作一团。\n"
    "第三十八回林潇湘魁夺菊花诗薛蘅芜讽和螃蟹咏——\n"
    "第1章重生\n尾。"
)


def test_split_chapters_headings_and_offsets():
    chapters = split_chapters(BOOK)
    assert [(c.title, c.text) for c in chapters] == [
        ("", "书名\n\n"),
        ("第一章 开端", "　　正文一。\n"),
        ("第12章：转折", "正文二。\n"),
        ("第一百二十回　大结局", "正文三。\n"),
        (
            "第三卷",
            "第四回中既将薛家母子在荣府内寄居等事略已表明，此回则暂不能写矣．\n"
            "第一回合，两人战作一团。\n"
            "第三十八回林潇湘魁夺菊花诗薛蘅芜讽和螃蟹咏——\n",
        ),
        ("第1章重生", "尾。"),
    ]
    assert chapters[0].start == 0
    for chapter in chapters[1:]:
        assert chapter.start == BOOK.index(chapter.title)


def test_book_without_headings_is_one_untitled_chapter():
    text = "　　很久以前。\n有座山。\n"
    assert split_chapters(text) == [Chapter("", text, 0)]
    assert split_chapters("  \n") == []


def test_heading_on_first_line_has_no_preface_and_named_sections_count():
    text = "楔子　缘起\n前事。\n第一章\n正文。\n尾声\n完。"
    chapters = split_chapters(text)
    assert [(c.title, c.text, c.start) for c in chapters] == [
        ("楔子　缘起", "前事。\n", 0),
        ("第一章", "正文。\n", text.index("第一章")),
        ("尾声", "完。", text.index("尾声")),
    ]


@pytest.fixture(scope="module")
def novels(shared_data):
    return {name: read_text(shared_data / "novels" / f"{name}.txt") for name in NOVELS}


@pytest.mark.parametrize(
    "name, count, first, last",
    [
        ("hongloumeng", 121, "第一回  甄士隐梦幻识通灵　贾雨村风尘怀闺秀", "第一二零回  甄士隐详说太虚情　贾雨村归结红楼梦"),
        ("shuihuzhuan", 122, "楔子　张天师祈禳瘟疫　洪太尉误走妖魔", "第一百二十回  宋公明神聚蓼儿 徽宗帝梦游梁山泊"),
        ("xiyouji", 101, "第一回 灵根育孕源流出 心性修持大道生", "第一百回 径回东土 五圣成真"),
    ],
)
def test_novel_chapters(novels, name, count, first, last):
    text = novels[name]
    chapters = split_chapters(text)
    assert len(chapters) == count
    assert chapters[0].title == "" and chapters[0].text.strip().startswith("《")
    assert (chapters[1].title, chapters[-1].title) == (first, last)
    for chapter in chapters[1:]:
        assert text.startswith(chapter.title, chapter.start)
    assert squeeze("".join(c.title + c.text for c in chapters)) == squeeze(text)


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize(
    "text, max_chars, expected",
    [
        ("  你好。\n", 10, ["你好。"]),
        ("", 10, []),
        (" \n\u3000 ", 10, []),
        ("一二三。四五六。七八九。", 8, ["一二三。四五六。", "七八九。"]),
        # a paragraph end wins once the chunk is half full ...
        ("甲乙丙丁。\n戊己。庚辛。", 10, ["甲乙丙丁。", "戊己。庚辛。"]),
        # ... but not before
        ("甲。\n乙丙丁戊己。庚辛壬癸。", 10, ["甲。\n乙丙丁戊己。", "庚辛壬癸。"]),
        ("他说：“走吧。”我们走。", 8, ["他说：“走吧。”", "我们走。"]),
        ("等等……他来了。", 5, ["等等……", "他来了。"]),
        ("真的吗？！」好。", 6, ["真的吗？！」", "好。"]),
        # sentences longer than max_chars: clause marks, then whitespace, then a hard cut
        ("一二三，四五六，七八九。", 5, ["一二三，", "四五六，", "七八九。"]),
        ("甲乙 丙丁 戊己", 5, ["甲乙 丙丁", "戊己"]),
        ("甲乙丙丁戊己庚", 3, ["甲乙丙", "丁戊己", "庚"]),
        ("Hello world. This is it.", 14, ["Hello world.", "This is it."]),
    ],
)
def test_chunk_text_examples(text, max_chars, expected):
    assert chunk_text(text, max_chars) == expected


def test_max_chars_must_be_positive():
    with pytest.raises(ValueError, match="max_chars"):
        chunk_text("甲", 0)


def test_chunk_book_offsets_and_chapters():
    chunks = chunk_book(BOOK, max_chars=12)
    assert chunks[:3] == [
        Chunk("书名", "", 0, 0),
        Chunk("正文一。", "第一章 开端", 1, BOOK.index("正文一")),
        Chunk("正文二。", "第12章：转折", 2, BOOK.index("正文二")),
    ]
    assert_book_chunks_are_right(BOOK, chunks, 12)


@pytest.mark.parametrize("max_chars", [200, 800])
def test_novel_chunks_lose_and_repeat_nothing(novels, max_chars):
    for name, text in novels.items():
        chunks = chunk_book(text, max_chars)
        assert_book_chunks_are_right(text, chunks, max_chars)
        # Chunks end a sentence or a line ("诗曰："); the few others cut a too-long sentence at a clause or hard.
        odd = [c.text for c in chunks if not ends_sentence_or_line(text, c)]
        assert len(odd) <= 0.01 * len(chunks), name
        assert all(t[-1] in "，；：、,;:" or len(t) == max_chars for t in odd), name
        # Greedy packing keeps chunks reasonably full.
        assert sum(len(c.text) for c in chunks) / len(chunks) >= 0.6 * max_chars, name


def test_novel_chunk_text_covers_whole_book(novels):
    text = novels["xiyouji"]
    assert_chunks_cover(chunk_text(text, 800), text, 800)


# ---------------------------------------------------------------- random texts (hypothesis is not installed)

PIECES = list("甲乙丙丁戊己庚辛壬癸天地") * 4 + list("。！？!?…，；：、”」』）\"") + [
    " ", "\n", "\n\n", "\u3000", "\t", "\r\n", "……", "\n第一章 标题\n", "\n第二回\n", "第三卷 ",
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 300)))


def test_random_texts_chunk_text():
    rng = random.Random(20240601)
    for _ in range(400):
        text, max_chars = random_text(rng), rng.randint(1, 40)
        assert_chunks_cover(chunk_text(text, max_chars), text, max_chars)


def test_random_texts_chunk_book():
    rng = random.Random(7)
    for _ in range(400):
        text, max_chars = random_text(rng), rng.randint(1, 40)
        assert_book_chunks_are_right(text, chunk_book(text, max_chars), max_chars)
        chapters = split_chapters(text)
        assert squeeze("".join(c.title + c.text for c in chapters)) == squeeze(text)
