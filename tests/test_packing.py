"""Padding-free packing (data/packing.py): a packed batch gives every example the log-probabilities and the
gradients it gets in a padded batch, for every method that packs, on Llama, GPT-2 (Conv1D, learned positions) and
Qwen2 (biases); pretraining blocks keep their documents apart; preference pairs and reward scores read packed
segments; methods and models that cannot pack are refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, qa_rows, write_jsonl
from tuneforge.data.formats import normalise
from tuneforge.data.packing import balanced_rows, first_fit_decreasing, model_packing_refusal, pack_batch
from tuneforge.data.template import IGNORE_INDEX, Tokenized, ensure_chat_template
from tuneforge.methods import get_method
from tuneforge.objectives import get_objective
from tuneforge.models.logprobs import sequence_logps
from tuneforge.objectives.reward import RewardHead, reward_scores
from tuneforge.run.trainer import Trainer, training_examples

pytestmark = pytest.mark.usefixtures("single_thread")

PACKABLE = [name for name in tuneforge.available_methods() if get_method(name).packing_refusal is None]
REFUSED = [name for name in tuneforge.available_methods() if get_method(name).packing_refusal is not None]
# Options that make every trainable tensor receive a gradient from the first step (LoRA's B starts at zero).
OPTIONS = {"lora": {"r": 4, "init_lora_weights": False}, "qlora": {"r": 4, "init_lora_weights": False}}


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    return tok


def sft_items(tokenizer, n: int = 6):
    objective = get_objective("sft")(tokenizer)
    rows = qa_rows(n)
    for i, row in enumerate(rows):  # answers of different lengths: rows of different lengths
        row["output"] = " ".join([row["output"]] * (1 + i % 3))
    return objective, objective.prepare([normalise(r, "alpaca", f"qa:{i}") for i, r in enumerate(rows)], 128)


def logps_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch)
    logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logps.detach(), grads


def test_first_fit_decreasing_fills_rows_and_keeps_every_example():
    rows = first_fit_decreasing([5, 9, 2, 4, 7, 1], capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum([5, 9, 2, 4, 7, 1][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 28 tokens cannot fit in fewer rows of 10
    assert first_fit_decreasing([12, 3], capacity=10) == [[0], [1]]  # too long for any row: a row of its own


def test_rows_are_filled_evenly():
    rows = balanced_rows([300, 100, 120, 80], capacity=512)
    assert sorted(sum([300, 100, 120, 80][i] for i in row) for row in rows) == [300, 300]  # not 500 + 100
    assert balanced_rows([5, 5, 5], capacity=100) == [[0, 1, 2]]  # everything fits one row


def test_pack_batch_layout():
    a = Tokenized([11, 12, 13], [IGNORE_INDEX, 12, 13], "a")
    b = Tokenized([21, 22], [21, 22], "b")
    c = Tokenized([31, 32, 33, 34], [31, 32, 33, 34], "c", segments=(2,))  # a block holding two documents
    batch = pack_batch([a, b, c], pad_token_id=0, capacity=6)
    # 9 tokens need two rows of 6; filled evenly, at most 5 wide: c (4, longest first) alone, then a (3) + b (2).
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0], [0, 1, 2, 0, 1]]
    assert batch["example_ids"].tolist() == [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]]
    # No example's (or document's) first token is a label: nothing predicts across a boundary.
    assert batch["labels"].tolist() == [[-100, 32, -100, 34, -100], [-100, 12, 13, -100, 22]]
    assert batch["num_examples"] == 3 and "attention_mask" not in batch


@pytest.mark.parametrize("method", PACKABLE)
def test_packed_equals_padded_for_every_method(method, chat_tokenizer):
    objective, items = sft_items(chat_tokenizer)
    padded = objective.collate(items)
    objective.pack_capacity = 128
    packed = objective.collate(items)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # the padding is gone
    model = make_tiny_model("llama", len(chat_tokenizer))
    cls = get_method(method)
    cls.attach(model, cls.config_class.from_dict(OPTIONS.get(method, {})))
    model.eval()  # no dropout: the two passes must see the same network
    want, want_grads = logps_and_grads(model, padded)
    got, got_grads = logps_and_grads(model, packed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_packed_equals_padded_on_other_architectures(arch, chat_tokenizer):
    objective, items = sft_items(chat_tokenizer)
    padded = objective.collate(items)
    objective.pack_capacity = 128
    packed = objective.collate(items)
    model = make_tiny_model(arch, len(chat_tokenizer))
    tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False))
    want, want_grads = logps_and_grads(model, padded)
    got, got_grads = logps_and_grads(model, packed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_packed_pretraining_block_keeps_its_documents_apart(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    first, second = [5, 6, 7, 8, 9], [10, 11, 12]
    block = Tokenized(first + second, first + second, "block 0", segments=(len(first),))
    packed = pack_batch([block], tokenizer.pad_token_id, capacity=16)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([doc])).logits[0] for doc in (first, second)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_preference_pairs_and_reward_scores_read_packed_segments(chat_tokenizer):
    rows = [{"prompt": f"Q{i}?", "chosen": "yes " * (1 + i), "rejected": "no"} for i in range(4)]
    objective = get_objective("dpo")(chat_tokenizer)
    items = objective.prepare([normalise(r, "preference", f"p:{i}") for i, r in enumerate(rows)], 128)
    padded = objective.collate(items)
    objective.pack_capacity = 128
    packed = objective.collate(items)
    assert objective.units(packed) == objective.units(padded) == 4
    model = make_tiny_model("qwen2", len(chat_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, packed), sequence_logps(model, padded), rtol=1e-4,
                                   atol=1e-4)
        head = RewardHead(32)
        torch.testing.assert_close(reward_scores(model, head, packed), reward_scores(model, head, padded),
                                   rtol=1e-4, atol=1e-5)


def run(tmp_path, tokenizer, name: str, **changes):
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows(12))
    values = dict(model="tiny", method="lora", data=str(data), max_steps=3, batch_size=4, learning_rate=1e-2,
                  output=str(tmp_path / name), eval_generate=False, progress=False, general_eval="none")
    config = tuneforge.load_config(None, {**values, **changes})
    model = make_tiny_model("llama", len(tokenizer))
    trainer = Trainer(config, model, copy.deepcopy(tokenizer))
    trainer.prepare_data(*training_examples(config))
    trainer.train()
    return trainer, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_packs_by_default_and_reaches_the_padded_weights(tmp_path, tokenizer):
    packed, packed_weights = run(tmp_path, tokenizer, "packed")
    padded, padded_weights = run(tmp_path, tokenizer, "padded", packing=False)
    assert packed.objective.pack_capacity == 512 and padded.objective.pack_capacity is None
    # Float rounding differs (sums in another order); AdamW normalises a near-zero gradient element to a full step
    # of either sign, so one element may move by ~1e-5. Each step moves weights by ~1e-2 (the learning rate).
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("method", REFUSED)
def test_methods_that_cannot_pack_pad_by_default_and_refuse_to_pack(method, tmp_path, tokenizer):
    trainer, _ = run(tmp_path, tokenizer, "auto", method=method)
    assert trainer.objective.pack_capacity is None
    with pytest.raises(ValueError, match="packing: .*first example would see them"):
        run(tmp_path, tokenizer, "forced", method=method, packing=True)


def test_a_model_with_its_own_attention_mask_is_not_packed(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    assert model_packing_refusal(model) is None

    class OwnMasking(torch.nn.Module):  # defined here, in a module without transformers' create_causal_mask
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return input_ids

    assert "builds its own attention mask" in model_packing_refusal(OwnMasking())


def test_kto_packs_its_examples_and_the_mismatched_pairs(chat_tokenizer):
    rows = [{"prompt": f"Q{i}?", "completion": "yes " * (1 + i), "label": i % 2 == 0} for i in range(4)]
    objective = get_objective("kto")(chat_tokenizer)
    items = objective.prepare([normalise(r, "unpaired", f"u:{i}") for i, r in enumerate(rows)], 128)
    padded = objective.collate(items)
    objective.pack_capacity = 128
    packed = objective.collate(items)
    assert "kl_example_ids" in packed and objective.units(packed) == objective.units(padded) == 4
    model = make_tiny_model("llama", len(chat_tokenizer))
    with torch.no_grad():
        for prefix in ("", "kl_"):
            torch.testing.assert_close(sequence_logps(model, packed, prefix), sequence_logps(model, padded, prefix),
                                       rtol=1e-4, atol=1e-4)
