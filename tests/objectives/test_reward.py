"""Reward modelling: the Bradley–Terry loss, last-token pooling, learning a separable preference through the
trainer, and the saved head reloading into the scorer that `tuneforge score` and PPO use."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from tuneforge.config import RunConfig
from tuneforge.data.formats import DataError, normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods import attach
from tuneforge.objectives import TrainContext, get_objective
from tuneforge.commands import alignment as cli_alignment
from tuneforge.objectives.reward import (REWARD_HEAD_NAME, Reward, RewardHead, load_reward_model, reward_loss,
                                         reward_scores)
from tuneforge.run.trainer import Trainer, training_examples


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_loss_pinned_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    assert reward_loss(chosen, rejected).tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-0.5)])
    margin = torch.tensor([0.5, 0.0])
    assert reward_loss(chosen, rejected, margin).tolist() == pytest.approx([-log_sigmoid(0.5), -log_sigmoid(-0.5)])
    centred = reward_loss(chosen, rejected, None, 0.01).tolist()
    assert centred == pytest.approx([-log_sigmoid(1.0) + 0.01 * 1.0, -log_sigmoid(-0.5) + 0.01 * 0.25])


def test_score_reads_the_last_real_token_whatever_the_padding(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    head = RewardHead(32)
    ids = torch.randint(5, len(tokenizer), (2, 7))
    alone = reward_scores(model, head, {"input_ids": ids[:1, :5], "attention_mask": torch.ones(1, 5, dtype=torch.long)})
    pad = torch.full((1, 2), tokenizer.pad_token_id)
    right = reward_scores(model, head, {"input_ids": torch.cat([ids[:1, :5], pad], 1),
                                         "attention_mask": torch.tensor([[1] * 5 + [0] * 2])})
    # Last-token pooling is the hidden state at position 4, not at the padding.
    with torch.no_grad():
        hidden = model(input_ids=ids[:1, :5], output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(alone, head(hidden)[None])
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)


def test_margin_from_records_and_validation(tokenizer):
    ensure_chat_template(tokenizer)
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "dog", "margin": 1.5},
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "fox"}]
    obj = Reward(tokenizer)
    batch = obj.collate(obj.prepare([normalise(r, "preference", f"p.jsonl:{i + 1}") for i, r in enumerate(rows)],
                                    128))
    assert batch["margin"].tolist() == [1.5, 0.0] and obj.units(batch) == 2
    with pytest.raises(DataError, match=r"p.jsonl:7: field 'margin'"):
        obj.prepare([normalise({**rows[0], "margin": "big"}, "preference", "p.jsonl:7")], 128)


# A separable preference: answers made of number words are preferred to answers made of animal words.
GOOD = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BAD = ["fox", "dog", "brown fox", "lazy dog", "quick fox", "the dog", "lazy fox", "quick dog", "brown dog"]


def preference_rows(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b, c = (int(torch.randint(0, 9, (1,), generator=g)) for _ in range(3))
        rows.append({"prompt": f"Say something about {GOOD[c]}.", "chosen": f"{GOOD[a]} {GOOD[b]}",
                     "rejected": f"{BAD[a]} {BAD[b]}"})
    return rows


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    """A LoRA reward model trained through the trainer on the separable set; held-out pairs as eval data."""
    root = tmp_path_factory.mktemp("reward")
    config = RunConfig(model=str(tiny_model_dir), method="lora", method_options={"r": 8}, objective="reward",
                       data=str(write_jsonl(root / "train.jsonl", preference_rows(0, 48))),
                       eval_data=str(write_jsonl(root / "eval.jsonl", preference_rows(1, 24))),
                       max_steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=0, lr_scheduler="constant",
                       output=str(root / "run"), eval_generate=False, progress=False)
    trainer = Trainer(config)
    trainer.prepare_data(*training_examples(config))
    # The head is sized from the model in setup(), which must precede the optimiser; the trainer calling
    # setup() again is harmless.
    trainer.objective.setup(trainer.model, trainer.ctx)
    base = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    before = trainer.evaluate_loss()
    result = trainer.train()
    return trainer, result, before, base, root


def test_accuracy_rises_above_90_percent_and_base_is_untouched(reward_run):
    trainer, result, before, base, _ = reward_run
    assert before["eval_accuracy"] < 0.8
    assert result.metrics["eval_accuracy"] > 0.9
    assert result.metrics["eval_loss"] < 0.5 * before["eval_loss"]
    assert result.metrics["eval_rewards/chosen"] > result.metrics["eval_rewards/rejected"]
    for k, v in trainer.model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    # The head trained with the adapter: it is among the optimiser's parameters.
    assert {"objective.reward_head.score.weight", "objective.reward_head.score.bias"} <= {n for n, _ in
                                                                                           trainer.trainable()}


def test_saved_reward_model_reloads_and_scores_identically(reward_run):
    trainer, _, _, _, root = reward_run
    run = root / "run"
    assert (run / REWARD_HEAD_NAME).is_file() and (run / "adapter_model.safetensors").is_file()
    rm = load_reward_model(None, run, device="cpu")  # the base model is read from adapter_config.json
    rows = preference_rows(2, 6)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = rm.score(prompts, responses)
    # The in-memory model + head of the run, scoring the same pairs through the objective's own batches.
    obj = trainer.objective
    batch = obj.collate(obj.prepare([normalise(r, "preference", f"x:{i}") for i, r in enumerate(rows)], 256))
    with torch.no_grad():
        expected = reward_scores(trainer.model.eval(), obj.head, batch)
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert sum(c > r for c, r in zip(scores[:6], scores[6:])) >= 5


def test_score_cli_writes_every_record_with_its_score(reward_run, tmp_path):
    _, _, _, _, root = reward_run
    parser = argparse.ArgumentParser(prog="tuneforge")
    cli_alignment.add_subcommands(parser.add_subparsers(dest="command"))
    records = [{"prompt": "Say something about one.", "response": "two three", "id": 1},
               {"prompt": "Say something about one.", "response": "lazy dog", "id": 2}]
    data = write_jsonl(tmp_path / "answers.jsonl", records)
    args = parser.parse_args(["score", "--reward", str(root / "run"), "--data", str(data),
                              "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"])
    assert args.func(args) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2] and out[0]["score"] > out[1]["score"]
    rm = load_reward_model(None, root / "run", device="cpu")
    assert [r["score"] for r in out] == pytest.approx(rm.score([r["prompt"] for r in records],
                                                               [r["response"] for r in records]), abs=1e-6)
    # Preference records get both scores; a prompt without its response is named.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(3, 2))
    args = parser.parse_args(["score", "--reward", str(root / "run"), "--data", str(pairs),
                              "--output", str(tmp_path / "pairs_out.jsonl"), "--device", "cpu"])
    args.func(args)
    first = json.loads((tmp_path / "pairs_out.jsonl").read_text().splitlines()[0])
    assert {"chosen_score", "rejected_score"} <= set(first)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "no answer here"}])
    args = parser.parse_args(["score", "--reward", str(root / "run"), "--data", str(bad), "--output",
                              str(tmp_path / "x.jsonl"), "--device", "cpu"])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'response'"):
        args.func(args)


def test_full_finetuning_trains_every_weight_and_the_head(tokenizer):
    ensure_chat_template(tokenizer)
    model = make_tiny_model("gpt2", len(tokenizer)).train()
    from tuneforge.methods.full import FullConfig

    handle = attach(model, FullConfig())
    obj = get_objective("reward")(tokenizer, {"center_rewards_coefficient": 0.01})
    batch = obj.collate(obj.prepare([normalise(r, "preference", f"x:{i}") for i, r in
                                     enumerate(preference_rows(4, 8))], 256))
    ctx = TrainContext(handle=handle)
    obj.setup(model, ctx)
    params = [p for _, p in handle.trainable_parameters()] + [p for _, p in obj.extra_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(8):
        loss, metrics = obj.loss(model, batch, ctx)
        (loss / obj.units(batch)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(metrics["loss"] / obj.units(batch))
    assert losses[-1] < losses[0]
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # TRL's default


def test_registered_and_options_validated(tokenizer):
    assert get_objective("reward") is Reward and get_objective("reward-model") is Reward
    with pytest.raises(ValueError, match="unknown option.*center_reward_coefficient"):
        Reward(tokenizer, {"center_reward_coefficient": 0.1})
    with pytest.raises(RuntimeError, match="setup"):
        Reward(tokenizer).extra_parameters()
