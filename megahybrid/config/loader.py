"""YAML -> RunConfig: inheritance (`base:`), dotted overrides, strict typed conversion with actionable errors.

- `base: other.yaml` (or a list) at the top of a file: the bases are loaded first (paths relative to the file)
  and this file's keys are deep-merged over them.
- Overrides `a.b.c=value` are parsed as YAML scalars (`lr=1e-6` gives a float, `stop=[a, b]` a list).
- Unknown keys, wrong types and failed cross-section checks raise `ConfigError`, whose lines each name the
  dotted path (and file) and what was expected; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megahybrid.config.schema import AlgorithmConfig, RunConfig


class ConfigError(ValueError):
    """One or more configuration problems, each a line naming the dotted key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------------------------- YAML + merging
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silent overwrite hides typos)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge `over` into a copy of `base`; mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Load a YAML file with its `base:` chain merged in (cycle-safe)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError([f"{path}: `base` inheritance cycle: {cycle}"])
    data = read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([f"{path}: `base` must be a path or a list of paths, got {bases!r}"])
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_raw(path.parent / base, (*_chain, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key.sub=value"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key component in {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {key}: value {raw!r} is not valid YAML ({exc})"]) from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError([f"override {text!r}: {part!r} is not a section"])
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------- typed conversion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


class _Converter:
    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def error(self, path: str, msg: str) -> None:
        self.problems.append(f"{self.source}: {path}: {msg}")

    def value(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            for arg in args:
                if arg is type(None):
                    continue
                sub = _Converter(self.source)
                out = sub.value(arg, value, path)
                if not sub.problems:
                    return out
            self.error(path, f"expected {_type_name(tp)}, got {value!r}")
            return None
        if origin is Literal:
            choices = typing.get_args(tp)
            if value in choices:
                return value
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
            return None
        if origin is list:
            (inner,) = typing.get_args(tp) or (Any,)
            if not isinstance(value, list):
                self.error(path, f"expected {_type_name(tp)}, got {value!r}")
                return None
            return [self.value(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.error(path, f"expected a mapping, got {value!r}")
                return None
            return dict(value)
        if dataclasses.is_dataclass(tp):
            return self.section(tp, value, path)
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads `1e-6` (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(value, str):
                return value
        self.error(path, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return None

    def section(self, cls: type, data: Any, path: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(path or "<top>", f"expected a mapping (section), got {data!r}")
            return cls()
        if cls is AlgorithmConfig or (isinstance(cls, type) and issubclass(cls, AlgorithmConfig)):
            cls = self._algorithm_class(data, path)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            dotted = f"{path}.{key}" if path else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(repr(f'{path}.{c}' if path else c) for c in close)}?" if close \
                    else f"; valid keys: {', '.join(fields)}"
                self.error(dotted, f"unknown key{hint}")
                continue
            kwargs[key] = self.value(hints[key], value, dotted)
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})

    def _algorithm_class(self, data: dict, path: str) -> type:
        from megahybrid.algorithms.registry import algorithm_names, get_algorithm

        name = data.get("name", AlgorithmConfig.name)
        if not isinstance(name, str):  # found by fuzzing: a list here crashed the registry lookup
            self.error(f"{path}.name", f"expected an algorithm name (a string), got {name!r}")
            return AlgorithmConfig
        try:
            return get_algorithm(name).Config
        except KeyError:
            close = difflib.get_close_matches(str(name), algorithm_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(f"{path}.name", f"unknown algorithm {name!r}; registered: "
                                       f"{', '.join(algorithm_names())}{hint}")
            return AlgorithmConfig


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(data: dict, source: str = "<config>") -> RunConfig:
    # an absent `algorithm:` section still resolves through the registry (to the default method's own Config)
    data = {**data, "algorithm": data.get("algorithm") or {}}
    conv = _Converter(source)
    cfg = conv.section(RunConfig, data, "")
    if conv.problems:
        raise ConfigError(conv.problems)
    # the architecture comes from model.hf_path's config.json (here, before validation, so every check sees the
    # real shape); the YAML's own `model:` keys are what it states, checked against the checkpoint
    from megahybrid.model.hf_config import apply_checkpoint

    given = data.get("model") if isinstance(data.get("model"), dict) else {}
    model, problems = apply_checkpoint(cfg.model, given)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return dataclasses.replace(cfg, model=model)


def load_config(path: str | Path, overrides: list[str] | None = None, validate: bool = True) -> RunConfig:
    """Load, merge bases, apply overrides, convert and (by default) validate a run config."""
    data = apply_overrides(load_raw(path), overrides or [])
    cfg = from_dict(data, str(path))
    if validate:
        from megahybrid.config.validate import validate_config

        problems = validate_config(cfg)
        if problems:
            raise ConfigError([f"{path}: {p}" for p in problems])
    return cfg


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain dict (the resolved config, as written into the run directory)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and \
                    isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value
    return docs
