"""Templates, prompt/response masks and length filtering, checked against the char tokenizer's one-token-per-
character property (an independent count) and the literal template texts from the papers."""
import pytest
import torch
from transformers import AutoTokenizer

from megahybrid.data import Example
from megahybrid.data.templates import SRFT_SYSTEM, SRFT_TEMPLATE, SUPERRL_SUFFIX, render_prompt
from megahybrid.data.tokenize import encode_pair, encode_prompt, filter_by_length, pad_pairs
from megahybrid.model.tiny import build_char_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def test_templates_literal_text(tok):
    q = "What is 2+2?"
    assert render_prompt(q, "plain") == q
    assert render_prompt(q, "superrl") == q + " Let's think step by step and output the final answer in \\boxed{}."
    srft = render_prompt(q, "srft")
    assert srft.startswith("Your task is to follow a systematic, thorough reasoning process")
    assert "\u201c<think>\\n {thoughts}</think>\\n\u201d" in srft and "`\\boxed{ }`" in srft
    assert srft.endswith("**Question:** What is 2+2?\n\n**Answer:** ")
    assert render_prompt("{x}", "srft").endswith("**Question:** {x}\n\n**Answer:** ")
    assert render_prompt(q, "chat", tok) == q + "\n"  # the char tokenizer's template: user turn + newline
    with pytest.raises(ValueError, match="data.template"):
        render_prompt(q, "alpaca")
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(q, "chat", None)


def test_templates_through_chat(tok):
    # the char tokenizer's chat template: each non-assistant turn's content + newline
    q = "What is 2+2?"
    srft = render_prompt(q, "srft", tok, chat=True)
    assert srft == SRFT_SYSTEM + "\n" + q + "\n"
    assert SRFT_TEMPLATE.startswith(SRFT_SYSTEM + "\n\n**Question:** ")
    assert render_prompt(q, "superrl", tok, chat=True) == q + " " + SUPERRL_SUFFIX + "\n"
    assert render_prompt(q, "plain", tok, chat=True) == render_prompt(q, "chat", tok) == q + "\n"
    assert render_prompt(q, "chat", tok, system="Be brief.") == "Be brief.\n" + q + "\n"


def test_encode_pair_masks_line_up(tok):
    prompt, response = "12+30=", "<think>12+30=42</think>\\boxed{42}"
    pair = encode_pair(tok, prompt, response)
    # plain text: BOS as the tokenizer itself prefixes it (`tok(text)`), then one token per character
    assert pair.token_ids[0] == tok.bos_token_id == tok(prompt)["input_ids"][0]
    assert pair.token_ids[1:-1] == tok.encode(prompt + response, add_special_tokens=False)
    assert pair.token_ids[-1] == tok.eos_token_id
    n_prompt = 1 + len(prompt)
    assert pair.prompt_mask == [True] * n_prompt + [False] * (len(pair.token_ids) - n_prompt)
    assert pair.response_mask == [not m for m in pair.prompt_mask]
    assert tok.decode([t for t, m in zip(pair.token_ids, pair.response_mask) if m][:-1]) == response
    # rollout token ids pass through untouched, EOS not duplicated
    ids = tok.encode("7", add_special_tokens=False) + [tok.eos_token_id]
    rollout = encode_pair(tok, prompt, ids)
    assert rollout.token_ids == encode_prompt(tok, prompt) + ids and rollout.num_prompt_tokens == n_prompt
    # chat-rendered text already holds what the template wants: nothing is added
    chat = encode_pair(tok, prompt, response, chat=True, add_eos=False)
    assert chat.token_ids == tok.encode(prompt + response, add_special_tokens=False)
    assert chat.num_prompt_tokens == len(prompt)
    # a prompt that already starts with BOS never gets a second one
    assert encode_prompt(tok, "<s>" + prompt) == [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)


def test_pad_pairs(tok):
    pairs = [encode_pair(tok, "1+1=", "2"), encode_pair(tok, "10+10=", "<think>10+10=20</think>\\boxed{20}")]
    out = pad_pairs(pairs, tok.pad_token_id)
    S, T = out["tokens"].shape
    assert (S, T) == (2, len(pairs[1].token_ids))
    assert out["tokens"][0, len(pairs[0].token_ids):].eq(tok.pad_token_id).all()
    assert out["response_mask"][0].sum() == 2 and not out["response_mask"][:, 0].any()
    assert torch.equal(out["attention_mask"], out["prompt_mask"] | out["response_mask"])


def test_filter_by_length_counts(tok):
    exs = [Example("1+1=", "2", demos=["x" * 5, "y" * 9]), Example("1" * 20, "1", demos=["z"]),
           Example("2+2=", "4", demos=[])]
    kept, counts = filter_by_length(exs, tok, max_prompt_tokens=10, max_demo_tokens=6)
    # prompt lengths BOS + 4, 20, 4 chars; demos + EOS: 6, 10 tokens
    assert [e.prompt for e in kept] == ["1+1=", "2+2="]
    assert kept[0].demos == ["x" * 5] and exs[0].demos == ["x" * 5, "y" * 9]  # input not mutated
    assert counts == {"data/filtered_prompts": 1.0, "data/filtered_demos": 1.0, "data/kept_prompts": 2.0}
    # superrl: BOS + question + space + suffix; `\\boxed{` in the suffix is one token, every other character one
    n_suffix = len(render_prompt("", "superrl")) - (len("\\boxed{") - 1)
    kept, counts = filter_by_length(exs, tok, template="superrl", max_prompt_tokens=1 + 4 + n_suffix,
                                    max_demo_tokens=100)
    assert [e.prompt for e in kept] == ["1+1=", "2+2="] and counts["data/filtered_prompts"] == 1.0
    kept, counts = filter_by_length(exs, tok, template="superrl", max_prompt_tokens=1 + 3 + n_suffix,
                                    max_demo_tokens=100)
    assert kept == [] and counts["data/filtered_prompts"] == 3.0
