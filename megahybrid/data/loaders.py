"""JSONL / Parquet loaders: the generic record schema and the OpenR1-Math-46k-8192 schema.

Generic schema (one object per line / row):
    prompt (str; alias question, problem), answer (str|int|float; alias final_answer),
    demos (list[str] or str; alias demo, response), steps (list[str]), source (str), meta (object);
    other keys are kept in `meta`.
OpenR1-Math-46k-8192 (LUFFY/SRFT parquet): data_source (str), prompt (list of {role, content}; the question is
    the last `user` turn), target (list of {role, content}; `assistant` turns are the R1 demonstrations),
    ability (str), reward_model ({ground_truth, style}), extra_info ({index, split}).

`write_jsonl` writes records in the generic schema, atomically (`training.run_dir.atomic_write_text`).

Every malformed row raises `DataError` naming file:line:field (parquet: the 1-based row number), or is skipped
and counted in `LoadStats` when `skip_bad_rows` is on.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from megahybrid.data.records import DataError, Example, LoadStats

_PROMPT_KEYS = ("prompt", "question", "problem")
_ANSWER_KEYS = ("answer", "final_answer")
_DEMO_KEYS = ("demos", "demo", "response")
_KNOWN = {*_PROMPT_KEYS, *_ANSWER_KEYS, *_DEMO_KEYS, "steps", "source", "meta"}


def iter_rows(path: str, file_type: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, decoded object) for each non-blank line of a JSONL file / row of a Parquet file."""
    if file_type == "jsonl":
        with open(path, "rb") as fh:  # bytes, so that one bad byte names its line instead of failing the file
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield line_no, DataError(path, line_no, None,
                                             f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, DataError(path, line_no, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
    elif file_type == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(path, None, None, f"not a readable Parquet file ({exc})") from None
        row_no = 0
        for batch in batches:
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    else:
        raise ValueError(f"unknown file type {file_type!r} for {path} (expected jsonl or parquet)")


def _file_type(path: str, fmt: str) -> str:
    if fmt in ("jsonl", "parquet"):
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise DataError(path, None, None, f"cannot tell the format from the extension {ext!r}; set data.format")


def _pick(row: dict, keys: tuple[str, ...], ctx: tuple[str, int], required: bool) -> tuple[str, Any]:
    for k in keys:
        if k in row and row[k] is not None:
            return k, row[k]
    if required:
        raise DataError(*ctx, keys[0], f"missing (expected one of {', '.join(keys)})")
    return keys[0], None


def _want_str(value: Any, ctx: tuple[str, int], name: str) -> str:
    if not isinstance(value, str):
        raise DataError(*ctx, name, f"expected a string, got {type(value).__name__}")
    return value


def _want_str_list(value: Any, ctx: tuple[str, int], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise DataError(*ctx, name, f"expected a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        _want_str(v, ctx, f"{name}[{i}]")
    return list(value)


def _nonempty(text: str, ctx: tuple[str, int], name: str) -> str:
    if not text.strip():
        raise DataError(*ctx, name, "is empty")
    return text


def _answer_str(value: Any, ctx: tuple[str, int], name: str) -> str:
    # bool is an int subclass but never a meaningful math answer
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(*ctx, name, f"expected a string or number, got {type(value).__name__}")
    if isinstance(value, float) and value != value:
        raise DataError(*ctx, name, "is NaN")
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return _nonempty(text, ctx, name)


def parse_generic(row: Any, ctx: tuple[str, int]) -> Example:
    """A generic-schema row -> Example (raises DataError naming the field)."""
    if not isinstance(row, dict):
        raise DataError(*ctx, None, f"expected a JSON object, got {type(row).__name__}")
    pk, prompt = _pick(row, _PROMPT_KEYS, ctx, required=True)
    ak, answer = _pick(row, _ANSWER_KEYS, ctx, required=True)
    dk, demos = _pick(row, _DEMO_KEYS, ctx, required=False)
    steps = row.get("steps")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(*ctx, "meta", f"expected an object, got {type(meta).__name__}")
    meta = {**meta, **{k: v for k, v in row.items() if k not in _KNOWN}}
    source = row.get("source", ctx[0])
    return Example(
        prompt=_nonempty(_want_str(prompt, ctx, pk), ctx, pk), answer=_answer_str(answer, ctx, ak),
        demos=[] if demos is None else _want_str_list(demos, ctx, dk),
        steps=None if steps is None else _want_str_list(steps, ctx, "steps"),
        source=_want_str(source, ctx, "source"), meta=meta,
    )


def _turns(value: Any, ctx: tuple[str, int], name: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(*ctx, name, f"expected a list of {{role, content}} turns, got {type(value).__name__}")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(*ctx, f"{name}[{i}]", f"expected an object, got {type(turn).__name__}")
        for key in ("role", "content"):
            _want_str(turn.get(key), ctx, f"{name}[{i}].{key}")
    return value


def parse_openr1(row: Any, ctx: tuple[str, int]) -> Example:
    """An OpenR1-Math-46k-8192 row -> Example (question = last user turn, demos = assistant turns of target)."""
    if not isinstance(row, dict):
        raise DataError(*ctx, None, f"expected an object, got {type(row).__name__}")
    if "prompt" not in row:
        raise DataError(*ctx, "prompt", "missing")
    users = [t["content"] for t in _turns(row["prompt"], ctx, "prompt") if t["role"] == "user"]
    if not users:
        raise DataError(*ctx, "prompt", "no turn with role 'user'")
    rm = row.get("reward_model")
    if not isinstance(rm, dict):
        raise DataError(*ctx, "reward_model", f"expected an object with ground_truth, got {type(rm).__name__}")
    if rm.get("ground_truth") is None:
        raise DataError(*ctx, "reward_model.ground_truth", "missing")
    target = row.get("target") or []
    demos = [t["content"] for t in _turns(target, ctx, "target") if t["role"] == "assistant"]
    source = row.get("data_source") or ctx[0]
    meta = {k: row[k] for k in ("ability", "extra_info") if row.get(k) is not None}
    return Example(
        prompt=_nonempty(users[-1], ctx, "prompt"),
        answer=_answer_str(rm["ground_truth"], ctx, "reward_model.ground_truth"),
        demos=demos, source=_want_str(source, ctx, "data_source"), meta=meta,
    )


def load_file(path: str, fmt: str = "auto", *, skip_bad_rows: bool = False,
              stats: LoadStats | None = None) -> list[Example]:
    """Load every row of a JSONL/Parquet file. `fmt`: auto | jsonl | parquet | openr1 (DataConfig.format)."""
    if not os.path.exists(path):
        raise DataError(path, None, None, "file not found")
    stats = stats if stats is not None else LoadStats()
    file_type = _file_type(path, "auto" if fmt == "openr1" else fmt)
    out: list[Example] = []
    first_line_of_id: dict[Any, int] = {}
    for line_no, row in iter_rows(path, file_type):
        stats.num_rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            is_openr1 = fmt == "openr1" or (isinstance(row, dict) and "reward_model" in row)
            ex = (parse_openr1 if is_openr1 else parse_generic)(row, (path, line_no))
            _check_unique_id(ex, first_line_of_id, (path, line_no))
            out.append(dataclasses.replace(ex, location=f"{path}:{line_no}"))
        except DataError as err:
            if not skip_bad_rows:
                raise
            stats.add_bad(err)
    if stats.num_rows == 0:
        raise DataError(path, None, None, "no records (the file is empty)")
    return out


def _check_unique_id(ex: Example, first_line_of_id: dict[Any, int], ctx: tuple[str, int]) -> None:
    """A record `id` seen twice is a duplicated row (a bad merge), which would silently weight that problem twice."""
    rid = ex.meta.get("id")
    if rid is None or not isinstance(rid, (str, int)):
        return
    if rid in first_line_of_id:
        raise DataError(*ctx, "id", f"duplicate id {rid!r} (first at line {first_line_of_id[rid]})")
    first_line_of_id[rid] = ctx[1]


def write_jsonl(examples: Iterable[Example], path: str) -> int:
    """Write `examples` as generic-schema JSONL; returns the row count. Rows are streamed to a temporary file
    (memory stays flat for OpenR1-sized data) that replaces `path` only once every row is written, so a failure
    never leaves a partial file or clobbers an old one."""
    from megahybrid.training.run_dir import atomic_writer  # the project's one atomic writer

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with atomic_writer(Path(path)) as fh:
        for ex in examples:
            row = {k: v for k, v in dataclasses.asdict(ex).items() if k != "location"}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
