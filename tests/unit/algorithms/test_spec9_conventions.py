"""The three conventions SPEC section 9 gained: SRFT's contradictory weight settings are a config error (exit 2),
SRL strips a data file's expert step like the splitter's, SuperRL treats a demo with no unmasked token as absent."""
import dataclasses

import torch

from megahybrid.cli import main
from megahybrid.data import Example
from megahybrid.data.srl import build_srl_instances
from megahybrid.rewards.functions import srl_similarity

from algo_harness import make_algo, make_batch, run_split


def test_srft_entropy_weights_off_with_a_fixed_coef_is_exit_2(tmp_path, capsys):
    for key in ("sft_coef_fixed", "rl_coef_fixed"):
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"algorithm:\n  name: srft\n  entropy_weights: false\n  {key}: 1.0\n")
        assert main(["config", "check", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"algorithm.{key}" in err and "entropy_weights: false" in err, err
    # each alone is still fine
    path = tmp_path / "ok.yaml"
    path.write_text("algorithm:\n  name: srft\n  sft_coef_fixed: 1.0\n")
    assert main(["config", "check", str(path)]) == 0


def test_srl_strips_expert_steps_from_a_data_file():
    ex = Example(prompt="Add 12 and 30.", answer="42", steps=["  1. 12+30 = 42\n", "\t2. answer 42  \n"])
    instance = build_srl_instances(ex)[0]  # k = 2: the step to predict is the file's second step
    response = "<think>add</think>2. answer 42"
    assert srl_similarity(response, instance.answer) == 1.0
    # the splitter's steps were already stripped; the same text from a file now scores the same
    assert srl_similarity(response, "2. answer 42") == srl_similarity(response, "\n  2. answer 42 \n") == 1.0


def test_superrl_demo_without_unmasked_tokens_is_absent():
    """A prompt whose only demo has no response token has no demo: with c = 0 it is `no_signal`, not SFT, and the
    loss and gradient equal those of the same batch without that demo row."""
    torch.manual_seed(0)
    batch, logp, entropy = make_batch(3, num_prompts=4, k=3, demos=(1, 1, 1, 1), rewards="nonpositive",
                                      min_response=1)
    demo_rows = torch.nonzero(batch.is_demo).flatten()
    empty = int(demo_rows[0])
    mask = batch.response_mask.clone()
    mask[empty] = False
    emptied = dataclasses.replace(batch, response_mask=mask)
    keep = torch.tensor([s for s in range(batch.num_sequences) if s != empty])
    for gate in ("reward", "advantage"):
        loss_a, _, final_a, _ = run_split(make_algo("superrl", gate=gate), emptied, logp, entropy)
        (grad_a,) = torch.autograd.grad(loss_a, logp)
        loss_b, _, final_b, _ = run_split(make_algo("superrl", gate=gate), batch.select(keep), logp[keep],
                                          entropy[keep])
        assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-12)
        assert final_a["superrl/sft_frac"] == final_b["superrl/sft_frac"]
        assert final_a["superrl/no_signal"] == final_b["superrl/no_signal"]
        assert torch.all(grad_a[empty] == 0)
    # reward gate, all rewards <= 0: every prompt has c = 0; the one with the empty demo is no_signal, not SFT
    _, _, final, _ = run_split(make_algo("superrl", gate="reward"), emptied, logp, entropy)
    assert final["superrl/sft_frac"] == 3 / 4 and final["superrl/no_signal"] == 1
