"""KTO: the unpaired data shape (validated, naming file, line and field); the loss equals TRL's KTOTrainer
(trl.KTOTrainer._compute_loss, trl 1.16, whose loss is inline: transcribed below) on identical log-probs; the KL
reference point pairs each prompt with the previous answer; and the objective trains through the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tuneforge
from conftest import make_tiny_model, write_jsonl
from tuneforge.config import RunConfig
from tuneforge.data.formats import DataError, load_examples
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods import attach
from tuneforge.methods.lora import LoRAConfig
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.objectives.kto import KTO, kto_loss


def trl_kto(policy, ref, labels, kl_policy, kl_ref, beta, dw, uw, loss_type):
    """KTOTrainer._compute_loss's loss lines (trl/trainer/kto_trainer.py), on given sequence log-probs."""
    chosen_idx, rejected_idx = labels.nonzero().view(-1), (~labels).nonzero().view(-1)
    chosen_logps, rejected_logps = policy.index_select(0, chosen_idx), policy.index_select(0, rejected_idx)
    ref_chosen, ref_rejected = ref.index_select(0, chosen_idx), ref.index_select(0, rejected_idx)
    kl = (kl_policy - kl_ref).mean().detach().clamp(min=0) if loss_type == "kto" else torch.zeros(1)
    chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    return torch.cat((dw * chosen_losses, uw * rejected_losses), 0).nanmean()


@pytest.mark.parametrize("loss_type, beta, dw, uw", [("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 1.0),
                                                     ("apo_zero_unpaired", 0.1, 1.0, 0.7)])
def test_loss_and_gradient_match_trl(loss_type, beta, dw, uw):
    g = torch.Generator().manual_seed(0)
    policy, ref = -torch.rand(7, generator=g) * 20, -torch.rand(7, generator=g) * 20
    kl_policy, kl_ref = -torch.rand(7, generator=g) * 20, -torch.rand(7, generator=g) * 20
    labels = torch.tensor([True, False, True, True, False, False, True])
    a, b = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    expected = trl_kto(a, ref, labels, kl_policy, kl_ref, beta, dw, uw, loss_type)
    kl = (kl_policy - kl_ref).mean().clamp(min=0)
    got = kto_loss(b, ref, labels, kl, beta, dw, uw, loss_type)[0].mean()
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(b.grad, a.grad)


def test_unpaired_records_are_detected_and_validated(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                                 {"prompt": "Hi", "completion": "Go away.", "label": False}])
    examples = load_examples(good)
    assert [e.kind for e in examples] == ["unpaired", "unpaired"] and [e.label for e in examples] == [True, False]
    assert examples[0].completion == [{"role": "assistant", "content": "Hello!"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                               {"prompt": "Hi", "completion": "Hello!", "label": "yes"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'label' must be true"):
        load_examples(bad)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "Hi", "completion": 3, "label": False}])
    with pytest.raises(DataError, match=r"missing.jsonl:1: field 'completion' must be a string"):
        load_examples(missing)


def rows(n=8):
    return [{"prompt": f"Say {i}.", "completion": "yes indeed" if i % 2 else "no", "label": bool(i % 2)}
            for i in range(n)]


def test_reference_point_uses_mismatched_answers(tokenizer, tmp_path):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("llama", len(tokenizer))
    ctx = TrainContext(handle=attach(model, LoRAConfig(r=4)))
    obj = KTO(tokenizer)
    items = obj.prepare(load_examples(write_jsonl(tmp_path / "d.jsonl", rows(3))), 64)
    batch = obj.collate(items)
    # Row 0's KL sequence is prompt 0 followed by answer 2 (the previous item, cyclically).
    kl_ids = batch["kl_input_ids"][0][batch["kl_attention_mask"][0].bool()].tolist()
    assert kl_ids == items[0].example.input_ids[:items[0].prompt_length] + \
        items[2].example.input_ids[items[2].prompt_length:]
    loss, metrics = obj.loss(model, batch, ctx)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)  # policy = reference at the start
    assert loss.item() == pytest.approx(3 * 0.5)  # every loss is 1 - σ(0)
    single = obj.collate(items[:1])  # TRL's cycling of a batch of 1: the answer is its own mismatched answer
    assert torch.equal(single["kl_input_ids"], single["input_ids"])
    assert get_objective("kto") is KTO


def test_trains_through_the_trainer(tiny_model_dir, tmp_path, single_thread):
    config = RunConfig(model=str(tiny_model_dir), method="lora", method_options={"r": 4}, objective="kto",
                       objective_options={"beta": 0.5}, data=str(write_jsonl(tmp_path / "kto.jsonl", rows())),
                       max_steps=10, batch_size=4, learning_rate=2e-2, warmup_steps=0, output=str(tmp_path / "run"),
                       eval_generate=False, progress=False)
    tuneforge.train(config)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "rewards/desirable" in r]
    assert len(steps) == 10 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
