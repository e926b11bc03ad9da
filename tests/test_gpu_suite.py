"""The GPU recipe suite's plumbing (bench/gpu_recipes.py) on the CPU, with shell commands standing in for the recipes:
rows recorded with their first-step time, the planned kill -9, a check that breaks, lanes side by side, a part that
raises, and the output checks on generated text holding U+2028."""

import json
import sys
import time

import pytest

from bench import gpu_recipes
from bench.gpu_recipes import FIRST_STEP, Suite, check_predictions, check_submission


@pytest.fixture
def suite(tmp_path):
    return Suite(tmp_path / "work", tmp_path, tmp_path / "out", budget_s=120)


def test_a_step_records_its_first_training_step_and_its_log(suite):
    # a progress bar that starts at a resumed step (3/9) and moves: the first step is the move, not the start
    result = suite.run("train", "echo ' 33%| 3/9 ['; sleep 0.6; echo ' 44%| 4/9 ['", first=FIRST_STEP)
    assert result.ok and result.note == ""
    assert 0.5 < result.first_s < result.wall_s + 0.1
    assert "4/9" in open(result.log).read()
    saved = json.loads((suite.out / "gpu_recipes.json").read_text())  # written after every step
    assert saved["results"][0]["step"] == "train" and saved["partial"]


def test_a_planned_kill_passes_and_an_early_exit_fails(suite, tmp_path):
    flag = tmp_path / "checkpoint"
    killed = suite.run("killed", f"touch {flag}; sleep 30", kill_when=flag.exists)
    assert killed.ok and killed.note == "killed as planned" and killed.wall_s < 10
    early = suite.run("early", "true", kill_when=lambda: False)
    assert not early.ok and early.note.startswith("ended (rc 0) before the kill")


def test_failures_are_rows_with_the_reason(suite):
    failed = suite.run("fails", "echo 'ValueError: bad field'; exit 3")
    assert not failed.ok and failed.note == "rc 3: ValueError: bad field"
    broken = suite.run("check breaks", "true", check=lambda log: json.loads("{"))
    assert not broken.ok and broken.note.startswith("check failed: JSONDecodeError")
    slow = suite.run("slow", "sleep 30", timeout=1)
    assert not slow.ok and slow.note.startswith("timed out")


def test_lanes_run_side_by_side_and_a_raising_part_is_a_failed_row(suite, monkeypatch):
    monkeypatch.setattr(gpu_recipes, "PARTS", ("a", "b", "c"))
    spans = {}

    def part(name):
        def run(s):
            start = time.time()
            s.run(f"{name}1", "sleep 3")
            spans[name] = (start, time.time())
        return run

    suite.run_lanes([("b",), ("a", "c")], {"a": part("a"), "b": part("b"), "c": lambda s: 1 / 0})
    assert spans["a"][0] < spans["b"][1]  # the second lane started while the first ran
    rows = {r.step: r for r in suite.results}
    assert rows["a1"].ok and rows["b1"].ok and rows["a1"].part == "a" and rows["b1"].lane_peers == 1
    assert not rows["c: ZeroDivisionError"].ok
    table = suite.table("t")
    assert table.index("| a1 |") < table.index("| b1 |") < table.index("| c: ZeroDivisionError |")  # by part
    assert "2 of 3 steps passed" in table


def test_output_checks_keep_rows_with_unicode_line_separators(tmp_path):
    rows = [{"response": "第一句\u2028第二句"}, {"response": "甲\x1c乙"}]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "metrics.json").write_text("{}")
    assert check_predictions(tmp_path, 2)("") == ""
    submit = tmp_path / "submit.json"
    submit.write_text("".join(json.dumps({"output": r["response"]}, ensure_ascii=False) + "\n" for r in rows))
    assert check_submission(submit, 2)("") == ""
    assert check_submission(submit, 3)("") == "2 records, 2 with an output"


def test_the_suite_refuses_an_unknown_part(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_recipes.py", "--only", "lora,nope"])
    with pytest.raises(SystemExit):
        gpu_recipes.main()
    assert "unknown parts ['nope']" in capsys.readouterr().err


def test_the_tianchi_job_runs_only_when_named(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_recipes.time, "sleep", lambda seconds: None)  # the lanes' staggered starts

    def lanes_run(only):
        suite = Suite(tmp_path / "work", tmp_path, tmp_path / "out", budget_s=60, only=only)
        ran = []
        suite.run_lanes(gpu_recipes.LANES, {part: lambda s, part=part: ran.append(part) for part in gpu_recipes.PARTS})
        return sorted(ran)

    assert lanes_run(set()) == sorted(p for p in gpu_recipes.PARTS if p != "tianchi")  # the whole suite
    assert lanes_run({"tianchi"}) == ["tianchi"]
    assert lanes_run({"shapes", "tianchi"}) == ["shapes", "tianchi"]
