"""Property-based fuzzing of the config loader through the CLI: whatever a YAML file or a dotted override holds,
`megahybrid config check` exits 0 with a config that loads again, or exits 2 with `config error:` lines; it never
raises (a traceback) and never exits with anything else."""
import dataclasses
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megahybrid.cli import main
from megahybrid.config.loader import load_config
from megahybrid.config.schema import RunConfig


def _dotted_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        yield key
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _dotted_keys(f.default_factory, key + ".")


KEYS = sorted(set(_dotted_keys(RunConfig))) + ["algorithm.name", "algorithm.sft_coef", "train.stepz", "base"]
_scalars = (st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from(["srft", "grpo", "auto", "chat", "1e-4", "builtin:arith", "", "[1, 2", "{a: 1}"])
            | st.text(alphabet=string.printable, max_size=12))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                        max_size=2), max_leaves=6)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node, parts = out, dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return out


_yaml_text = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), _values, max_size=4).map(lambda d: __import__("yaml").safe_dump(_nest(d))),
    st.text(alphabet=string.printable, max_size=60),
)
_override = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
                                st.text(alphabet=string.printable.replace("\n", ""), max_size=10)),
                      st.text(alphabet=string.printable.replace("\n", ""), max_size=15))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_yaml_text, overrides=st.lists(_override, max_size=3))
def test_fuzz_config_check_exits_0_or_2(tmp_path, capsys, text, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    overrides = [o for o in overrides if not o.startswith("-")]  # leading dashes are argparse options
    code = main(["config", "check", str(path), *overrides])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("config error: ") and "Traceback" not in err, err
    else:
        assert load_config(path, overrides) is not None


def test_fuzz_covers_both_outcomes(tmp_path, capsys):
    """The strategies above reach valid configs too, not only errors (or the property would be vacuous)."""
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  steps: 3\n")
    assert main(["config", "check", str(path)]) == 0
    path.write_text("train:\n  steps: [1, 2\n")
    assert main(["config", "check", str(path)]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # argparse's own usage error is exit 2 too
        main(["config", "check"])
    assert info.value.code == 2
