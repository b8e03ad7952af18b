"""SRL step splitting and instance construction (SPEC 4.6)."""
import pytest

from megahybrid.data import Example
from megahybrid.data.srl import build_srl_dataset, build_srl_instances, split_steps


@pytest.mark.parametrize("text, steps", [
    ("1. a\n2. b\n3. c", ["1. a", "2. b", "3. c"]),
    ("We start.\n1) a\n2) b", ["We start.\n1) a", "2) b"]),
    ("Step 1: a\nmore a\nStep 2: b", ["Step 1: a\nmore a", "Step 2: b"]),
    ("**Step 1**: a\n\n**Step 2:** b", ["**Step 1**: a", "**Step 2:** b"]),
    ("**1.** a\n**2.** b", ["**1.** a", "**2.** b"]),
    ("para one\n\npara two\n1.5 is a decimal, not a step\n\n  \n para three", 
     ["para one", "para two\n1.5 is a decimal, not a step", "para three"]),
    ("1. only one numbered line\n\nthen a paragraph", ["1. only one numbered line", "then a paragraph"]),
    ("", []),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps


def test_custom_pattern():
    assert split_steps("- a\n- b\n- c", pattern=r"^- ") == ["- a", "- b", "- c"]


def test_instances_k2_to_n():
    ex = Example("P?", "42", steps=["s1", "s2", "s3", "s4"], source="t", meta={"id": 1})
    inst = build_srl_instances(ex)
    assert len(inst) == 3  # N - 1
    assert [i.prompt for i in inst] == ["P?\ns1", "P?\ns1\ns2", "P?\ns1\ns2\ns3"]
    assert [i.answer for i in inst] == ["s2", "s3", "s4"]
    assert [i.meta["srl_k"] for i in inst] == [2, 3, 4] and inst[0].meta["final_answer"] == "42"
    first = build_srl_instances(ex, first_step=True)
    assert len(first) == 4 and first[0].prompt == "P?" and first[0].answer == "s1"


def test_instances_from_demo_and_dataset():
    ex = Example("Q", "1", demos=["1. x\n2. y"])
    assert [i.answer for i in build_srl_instances(ex)] == ["2. y"]
    assert build_srl_instances(Example("Q", "1")) == []
    assert len(build_srl_dataset([ex, ex, Example("Q", "1", steps=["a"])])) == 2
