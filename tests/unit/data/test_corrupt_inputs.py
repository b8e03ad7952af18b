"""Corrupt inputs: every loader names the file, line and field; nothing crashes with a bare traceback.

The CLI-level half (exit code 2, printed once, no run directory written) is in tests/e2e/test_bad_inputs_cli.py;
here each loader is fed each kind of corruption directly, plus property-based fuzzing of the JSONL loader.
"""
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megahybrid.data import DataError, Example
from megahybrid.data.loaders import load_file, write_jsonl


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


GOOD = {"prompt": "1+1=", "answer": "2"}


@pytest.mark.parametrize("bad, line, field, words", [
    ({"prompt": "   ", "answer": "2"}, 2, "prompt", "is empty"),
    ({"prompt": "1+1=", "answer": ""}, 2, "answer", "is empty"),
    ({"prompt": "1+1="}, 2, "answer", "missing"),
    ({"prompt": ["1+1="], "answer": "2"}, 2, "prompt", "expected a string"),
    ({"prompt": "1+1=", "answer": {"v": 2}}, 2, "answer", "expected a string or number"),
    ({"prompt": "1+1=", "answer": "2", "demos": 5}, 2, "demos", "expected a list of strings"),
    ({"prompt": "1+1=", "answer": "2", "meta": []}, 2, "meta", "expected an object"),
    (b"\xff\xfe not utf-8", 2, None, "not valid UTF-8 (byte 0xff at column 1)"),
    (b'{"prompt": "1+1=", "answer": "2"', 2, None, "malformed JSON"),
])
def test_bad_jsonl_rows(tmp_path, bad, line, field, words):
    path = _jsonl(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_file(path)
    assert (info.value.file, info.value.line, info.value.field) == (path, line, field)
    assert words in str(info.value) and str(info.value).startswith(f"{path}:{line}:")


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _jsonl(tmp_path, [dict(GOOD, id=7), dict(GOOD, id=8), dict(GOOD, id=7)])
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'id' duplicate id 7 \(first at line 1\)"):
        load_file(path)


def test_empty_files(tmp_path):
    for name, content in (("e.jsonl", b""), ("blank.jsonl", b"\n  \n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match="no records"):
            load_file(str(tmp_path / name))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    with pytest.raises(DataError, match="no records"):
        load_file(str(tmp_path / "e.parquet"))


def test_parquet_wrong_schema_and_not_parquet(tmp_path):
    pq.write_table(pa.table({"question_text": ["1+1="], "solution": ["2"]}), tmp_path / "w.parquet")
    with pytest.raises(DataError) as info:
        load_file(str(tmp_path / "w.parquet"))
    assert (info.value.line, info.value.field) == (1, "prompt") and "missing" in str(info.value)
    pq.write_table(pa.table({"prompt": [3], "answer": ["2"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet:1: field 'prompt' expected a string, got int"):
        load_file(str(tmp_path / "t.parquet"))
    (tmp_path / "x.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_file(str(tmp_path / "x.parquet"))


def test_records_know_where_they_came_from(tmp_path):
    path = _jsonl(tmp_path, [GOOD, b"", GOOD])
    assert [ex.location for ex in load_file(path)] == [f"{path}:1", f"{path}:3"]


def test_write_jsonl_streams_and_never_leaves_a_partial_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    seen = []

    def rows():
        for i in range(3):
            seen.append(i)
            # the writer must not have collected earlier rows first: it writes as it goes
            yield Example(prompt=f"{i}+1=", answer=str(i + 1))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_jsonl(rows(), str(out))
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    assert write_jsonl((Example(prompt=f"{i}+1=", answer=str(i + 1)) for i in range(3)), str(out)) == 3
    assert [ex.answer for ex in load_file(str(out))] == ["1", "2", "3"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)
_rows = st.one_of(
    st.fixed_dictionaries({}, optional={k: _json_values for k in ("prompt", "question", "answer", "demos", "steps",
                                                                   "meta", "id", "source")}).map(json.dumps),
    st.text(alphabet=string.printable, max_size=30),
    st.binary(max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_rows, min_size=0, max_size=5))
def test_fuzz_jsonl_loader_only_ever_raises_data_error(tmp_path, lines):
    """Whatever bytes a JSONL file holds, the loader returns well-typed examples or raises DataError naming the
    file: never another exception (which the CLI would show as a traceback)."""
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    try:
        examples = load_file(str(path))
    except DataError as err:
        assert err.file == str(path)
        return
    for ex in examples:
        assert isinstance(ex.prompt, str) and ex.prompt.strip() and isinstance(ex.answer, str) and ex.answer.strip()
        assert all(isinstance(d, str) for d in ex.demos)
