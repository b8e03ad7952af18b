"""Loaders: generic JSONL/Parquet schema, the OpenR1-Math-46k-8192 schema, and errors naming file:line:field."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megahybrid.config.schema import DataConfig
from megahybrid.data import DataError, LoadStats, load_dataset
from megahybrid.data.loaders import load_file


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_generic_jsonl_rows(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1+1=", "answer": 2, "demos": ["<think>1+1=2</think>\\boxed{2}"], "id": 7}),
        "",
        json.dumps({"question": "What is x?", "answer": "\\frac{1}{2}", "demo": "x", "steps": ["a", "b"]}),
    ])
    rows = load_file(f)
    assert [r.prompt for r in rows] == ["1+1=", "What is x?"]
    assert [r.answer for r in rows] == ["2", "\\frac{1}{2}"]
    assert rows[0].demos == ["<think>1+1=2</think>\\boxed{2}"] and rows[1].demos == ["x"]
    assert rows[0].meta == {"id": 7} and rows[1].steps == ["a", "b"] and rows[0].steps is None


@pytest.mark.parametrize("line, field, words", [
    ('{"prompt": "a", "answer": ', None, "malformed JSON"),
    ('{"prompt": "a"}', "answer", "missing"),
    ('{"prompt": 5, "answer": "1"}', "prompt", "expected a string"),
    ('{"prompt": "a", "answer": true}', "answer", "expected a string or number"),
    ('{"prompt": "a", "answer": "1", "demos": ["x", 3]}', "demos[1]", "expected a string"),
    ('[1, 2]', None, "expected a JSON object"),
])
def test_bad_jsonl_row_names_file_line_field(tmp_path, line, field, words):
    good = json.dumps({"prompt": "p", "answer": "1"})
    f = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError) as info:
        load_file(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:3:"), msg
    assert words in msg
    if field is not None:
        assert f"field '{field}'" in msg
    assert (info.value.file, info.value.line, info.value.field) == (f, 3, field)


def test_skip_bad_rows_counts(tmp_path):
    good = json.dumps({"prompt": "p", "answer": "1"})
    f = write_lines(tmp_path / "d.jsonl", [good, "{oops", good, '{"prompt": "p"}'])
    stats = LoadStats()
    rows = load_file(f, skip_bad_rows=True, stats=stats)
    assert len(rows) == 2 and stats.num_rows == 4 and stats.num_bad_rows == 2
    assert stats.errors[0].startswith(f"{f}:2:") and stats.errors[1].startswith(f"{f}:4: field 'answer'")
    cfg = DataConfig(train=f, skip_bad_rows=True)
    stats2 = LoadStats()
    assert len(load_dataset(cfg, "train", stats=stats2)) == 2 and stats2.as_metrics()["data/bad_rows"] == 2.0


def openr1_row(i, question, answer, demo):
    # The OpenR1-Math-46k-8192 columns (LUFFY / SRFT): system + user prompt turns, R1 trace as the target turn.
    return {
        "data_source": "openr1",
        "prompt": [{"role": "system", "content": "Your task is to follow a systematic ..."},
                   {"role": "user", "content": question}],
        "target": [{"role": "assistant", "content": demo}],
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": i, "split": "default"},
    }


def test_openr1_parquet(tmp_path):
    rows = [openr1_row(0, "Find $x$ if $2x=1$.", "\\frac{1}{2}", "<think>\nhalve</think>\n\\boxed{\\frac{1}{2}}"),
            openr1_row(1, "How many primes below 10?", "4", "<think>2,3,5,7</think>\n\\boxed{4}")]
    f = str(tmp_path / "openr1.parquet")
    pq.write_table(pa.Table.from_pylist(rows), f)
    for fmt in ("auto", "openr1", "parquet"):
        ex = load_file(f, fmt)
        assert [e.prompt for e in ex] == ["Find $x$ if $2x=1$.", "How many primes below 10?"]
        assert [e.answer for e in ex] == ["\\frac{1}{2}", "4"]
        assert ex[1].demos == ["<think>2,3,5,7</think>\n\\boxed{4}"]
        assert ex[0].source == "openr1" and ex[0].meta["extra_info"] == {"index": 0, "split": "default"}
    ex = load_dataset(DataConfig(train=f, format="openr1"), "train")
    assert len(ex) == 2 and load_dataset(DataConfig(train=f), "eval") == []


def test_openr1_bad_rows_name_row_and_field(tmp_path):
    bad_answer = openr1_row(1, "q", "1", "d")
    bad_answer["reward_model"] = {"style": "rule", "ground_truth": None}
    f = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([openr1_row(0, "q", "1", "d"), bad_answer]), f)
    with pytest.raises(DataError, match=r"bad\.parquet:2: field 'reward_model\.ground_truth' missing"):
        load_file(f)
    bad_turn = openr1_row(0, "q", "1", "d")
    bad_turn["prompt"][1]["content"] = 3
    g = write_lines(tmp_path / "bad.jsonl", [json.dumps(openr1_row(0, "q", "1", "d")), json.dumps(bad_turn)])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'prompt\[1\]\.content' expected a string"):
        load_file(g, "openr1")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_file(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="data.format"):
        load_file(str(tmp_path / "d.txt"))
