"""The training loop: it learns, leaves the base untouched, accumulates gradients exactly, resumes to the same
weights, stops on NaN keeping the last checkpoint, logs metrics and protects finished runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from conftest import make_tiny_model, write_jsonl
from tuneforge.run import checkpoint as ckpt
from tuneforge.data.formats import load_examples
from tuneforge.data.template import tokenize_chat
from tuneforge.methods.lora import LoRAHandle
from tuneforge.objectives.sft import SFT
from tuneforge.run.trainer import EpochSampler, Trainer, TrainingDiverged, training_examples

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "zero one two three four five six seven eight nine".split()


def varied_rows(n: int = 8) -> list[dict]:
    """Answers from 1 to n words long, so micro-batches hold very different numbers of supervised tokens."""
    return [{"instruction": f"Count to {i + 1}.", "output": " ".join(WORDS[: i + 1] if i < 10 else WORDS)}
            for i in range(n)]


def config(tmp_path, data, name="run", **overrides):
    values = dict(data=str(data), output=str(tmp_path / name), max_steps=4, batch_size=4, learning_rate=1e-2,
                  max_length=64, progress=False, seed=0, warmup_steps=0)
    values.update(overrides)
    return tuneforge.load_config(None, values)


def train(cfg, tokenizer, arch="llama", model=None):
    model = model if model is not None else make_tiny_model(arch, len(tokenizer))
    return tuneforge.train(cfg, model, copy.deepcopy(tokenizer))


def data_loss(model, tokenizer, path) -> float:
    return tuneforge.perplexity(model, tokenizer, load_examples(path))["loss"]


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def metrics_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_targets(model) -> list[tuple[str, torch.nn.Linear]]:
    """The layers LoRA's default ``all-linear`` adapts: every linear layer but the output head."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("method,lr,steps", [("lora", 1e-2, 16), ("full", 2e-3, 8)])
def test_training_reduces_loss(tmp_path, tokenizer, sft_file, method, lr, steps):
    model = make_tiny_model("llama", len(tokenizer))
    tok = copy.deepcopy(tokenizer)
    before = data_loss(copy.deepcopy(model), _templated(tok), sft_file)
    result = tuneforge.train(config(tmp_path, sft_file, method=method, learning_rate=lr, max_steps=steps), model, tok)
    after = data_loss(result.model, result.tokenizer, sft_file)
    log = metrics_log(result.output)
    assert result.steps == steps and [m["step"] for m in log] == list(range(1, steps + 1))
    assert result.final_loss == pytest.approx(log[-1]["loss"], abs=1e-6)  # the last step's loss, as logged
    assert after < before - 0.2, (before, after)  # from ~ln(vocab): a tiny random model learns slowly
    fresh = make_tiny_model("llama", len(tokenizer))
    base_params = sum(p.numel() for p in fresh.parameters())
    if method == "full":
        assert result.metrics["trainable_params"] == result.metrics["total_params"] == base_params
    else:  # the default LoRA: r = 8 on every linear layer but the head, r x (in + out) parameters each
        lora_params = 8 * sum(m.in_features + m.out_features for _, m in lora_targets(fresh))
        assert result.metrics["trainable_params"] == lora_params
        assert result.metrics["total_params"] == base_params + lora_params


def _templated(tokenizer):
    from tuneforge.data.template import ensure_chat_template

    ensure_chat_template(tokenizer)
    return tokenizer


def test_lora_training_leaves_base_bit_identical(tmp_path, tokenizer, sft_file):
    model = make_tiny_model("qwen2", len(tokenizer))
    snapshot = {id(p): p.detach().clone() for p in model.parameters()}
    result = train(config(tmp_path, sft_file, method_options={"r": 4, "bias": "none"}), tokenizer, model=model)
    seen = 0
    for name, p in result.model.named_parameters():
        if id(p) in snapshot:
            seen += 1
            assert not p.requires_grad, name
            assert torch.equal(p, snapshot[id(p)]), name
        else:
            assert ".lora_" in name, name
    assert seen == len(snapshot)  # every base tensor is still the same object, untouched
    saved = adapter_tensors(tmp_path / "run")
    # Exactly A and B of every adapted layer (PEFT's names), and every B moved from its zero initialisation.
    targets = [n for n, _ in lora_targets(make_tiny_model("qwen2", len(tokenizer)))]
    assert len(targets) == 14 and sorted(saved) == sorted(f"base_model.model.{n}.lora_{ab}.weight" for n in targets
                                                          for ab in "AB")
    assert all(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("lora_B.weight"))


# -- gradient accumulation -----------------------------------------------------------------------------------


def test_gradient_accumulation_is_exact(tmp_path, tokenizer, monkeypatch):
    """batch_size=8 in one pass == micro_batch_size=2 over four passes, with examples of very different lengths:
    the loss is normalised over the supervised tokens of the whole accumulated batch."""
    data = write_jsonl(tmp_path / "varied.jsonl", varied_rows(8))
    grads: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(LoRAHandle, "after_backward", lambda self, step: grads.append(
        {n: p.grad.detach().clone() for n, p in self.trainable_parameters()}))
    # lr 1e-3: Adam's first step is lr * g / (|g| + eps), which turns float rounding in a near-zero gradient
    # element into up to ~lr * 1e-4 of weight difference; the gradients themselves are compared tightly.
    common = dict(batch_size=8, max_steps=1, method_options={"r": 4, "init_lora_weights": False},
                  max_grad_norm=None, lr_scheduler="constant", learning_rate=1e-3)
    one = train(config(tmp_path, data, "one", micro_batch_size=8, **common), tokenizer)
    four = train(config(tmp_path, data, "four", micro_batch_size=2, **common), tokenizer)
    assert len(grads) == 2
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    for key, value in adapter_tensors(one.output).items():
        torch.testing.assert_close(adapter_tensors(four.output)[key], value, rtol=1e-5, atol=1e-6)
    assert one.final_loss == pytest.approx(four.final_loss, rel=1e-6)

    # The check can fail: averaging the loss per micro-batch would give a clearly different gradient here.
    trainer = Trainer(config(tmp_path, data, "probe", micro_batch_size=2, **common),
                      make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))
    trainer.prepare_data(load_examples(data), [])
    trainer.model.train()
    batches = trainer.micro_batches(EpochSampler(len(trainer.train_items), 0))
    units = [trainer.objective.units(b) for b in batches]
    assert len(set(units)) > 1
    for b, n in zip(batches, units):
        (trainer.objective.loss(trainer.model, b, trainer.ctx)[0] / n / len(batches)).backward()
    per_micro = {n: p.grad for n, p in trainer.handle.trainable_parameters()}
    assert max((per_micro[n] - g).abs().max() / g.abs().max() for n, g in grads[0].items()) > 1e-2


# -- resume ------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_reaches_the_uninterrupted_weights(tmp_path, tokenizer, sft_file, monkeypatch):
    # Dropout > 0 and a cosine schedule: resuming must restore RNG, data position, optimiser and scheduler.
    common = dict(max_steps=6, save_every=2, batch_size=4, micro_batch_size=2, warmup_steps=1,
                  method_options={"r": 4, "lora_dropout": 0.3})
    reference = train(config(tmp_path, sft_file, "reference", **common), tokenizer)

    original = Trainer.optimizer_step

    def killed_at_step_6(self, batches, step):
        if step == 5:  # the 6th step: the last checkpoint is step 4, so step 5 is lost and done again
            raise Interrupted
        return original(self, batches, step)

    monkeypatch.setattr(Trainer, "optimizer_step", killed_at_step_6)
    with pytest.raises(Interrupted):
        train(config(tmp_path, sft_file, "killed", **common), tokenizer)
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    run = tmp_path / "killed"
    assert ckpt.latest_checkpoint(run).name == "step-4"
    assert not (run / "adapter_model.safetensors").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line the kill cut short

    resumed = train(config(tmp_path, sft_file, "killed", resume=True, **common), tokenizer)
    assert resumed.steps == 6
    want, got = adapter_tensors(reference.output), adapter_tensors(run)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)
    # The log continues from the checkpoint: each step once, with the losses of the uninterrupted run.
    ref_log = [json.loads(line) for line in (reference.output / "metrics.jsonl").read_text().splitlines()]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [m["step"] for m in ref_log] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in log] == pytest.approx([m["loss"] for m in ref_log], abs=1e-6)


def test_resume_without_restoring_rng_would_differ(tmp_path, tokenizer, sft_file, monkeypatch):
    """The resume test above can fail: with the RNG left as it is, dropout masks change and so do the weights."""
    common = dict(max_steps=4, save_every=2, method_options={"r": 4, "lora_dropout": 0.3})
    reference = train(config(tmp_path, sft_file, "reference", **common), tokenizer)
    original = Trainer.optimizer_step

    def killed(self, batches, step):
        if step == 2:
            raise Interrupted
        return original(self, batches, step)

    monkeypatch.setattr(Trainer, "optimizer_step", killed)
    with pytest.raises(Interrupted):
        train(config(tmp_path, sft_file, "killed", **common), tokenizer)
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    train(config(tmp_path, sft_file, "killed", resume=True, **common), tokenizer)
    want, got = adapter_tensors(reference.output), adapter_tensors(tmp_path / "killed")
    assert any(not torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_method_and_objective_state_survive_resume(tmp_path, tokenizer, sft_file, monkeypatch):
    """Non-parameter state (AdaLoRA's importance averages, PPO's KL coefficient) travels in checkpoints."""
    restored = {}
    monkeypatch.setattr(LoRAHandle, "training_state", lambda self: {"ema": torch.full((2, 3), float(self._n))})
    monkeypatch.setattr(LoRAHandle, "after_step", lambda self, step: setattr(self, "_n", step + 1))
    monkeypatch.setattr(LoRAHandle, "_n", 0, raising=False)
    monkeypatch.setattr(LoRAHandle, "load_training_state", lambda self, state: restored.update(method=state))
    monkeypatch.setattr(SFT, "training_state", lambda self: {"kl_coef": torch.tensor(0.25, dtype=torch.float64)})
    monkeypatch.setattr(SFT, "load_training_state", lambda self, state: restored.update(objective=state))
    train(config(tmp_path, sft_file, max_steps=4, save_every=3), tokenizer)
    (tmp_path / "run" / "adapter_model.safetensors").unlink()  # as if killed before the end
    train(config(tmp_path, sft_file, max_steps=4, save_every=3, resume=True), tokenizer)
    assert torch.equal(restored["method"]["ema"], torch.full((2, 3), 3.0))  # saved after step 3
    assert restored["objective"]["kl_coef"].item() == 0.25 and restored["objective"]["kl_coef"].dtype == torch.float64


def test_checkpoints_are_rotated(tmp_path, tokenizer, sft_file):
    train(config(tmp_path, sft_file, max_steps=5, save_every=1, keep_checkpoints=2), tokenizer)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    progress = json.loads((root / "step-4" / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["index"]) == (4, 0, 16)  # 4 steps x 4 of 16 records


# -- failures ----------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tokenizer, sft_file, monkeypatch):
    calls = {"n": 0}
    original = SFT.loss

    def nan_on_fifth(self, model, batch, ctx):
        calls["n"] += 1
        loss, metrics = original(self, model, batch, ctx)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    monkeypatch.setattr(SFT, "loss", nan_on_fifth)
    cfg = config(tmp_path, sft_file, max_steps=8, save_every=2)
    with pytest.raises(TrainingDiverged, match="step 5: loss is nan"):
        train(cfg, tokenizer)
    run = tmp_path / "run"
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step-4"
    trainable, state = ckpt.load_training_state(last)
    assert state["progress"]["step"] == 4
    assert not (run / "adapter_model.safetensors").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written dirs
    assert [m["step"] for m in metrics_log(run)] == [1, 2, 3, 4]  # the NaN step is not logged

    # The kept checkpoint is exactly the state after step 4 of the same run without the fault ...
    monkeypatch.setattr(SFT, "loss", original)
    reference = train(config(tmp_path, sft_file, "reference", max_steps=8, save_every=2), tokenizer)
    want, _ = ckpt.load_training_state(reference.output / "checkpoints" / "step-4")
    assert trainable.keys() == want.keys() and all(torch.equal(trainable[k], want[k]) for k in want)
    # ... and resumes (the fault is gone) to that run's final weights and losses.
    resumed = train(config(tmp_path, sft_file, max_steps=8, save_every=2, resume=True), tokenizer)
    assert resumed.steps == 8
    got, final = adapter_tensors(run), adapter_tensors(reference.output)
    assert got.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(got[key], final[key], rtol=0, atol=1e-7)
    assert [m["loss"] for m in metrics_log(run)] == pytest.approx([m["loss"] for m in metrics_log(reference.output)],
                                                                   abs=1e-6)


def test_metrics_log_and_eval(tmp_path, tokenizer, sft_file):
    # Two of the four held-out answers are made what the untrained base answers greedily: the exact match logged
    # before training (LoRA's base: the adapter switched off) must then be exactly 2 / 4.
    held_out = training_examples(config(tmp_path, sft_file, eval_split=0.25))[1]
    base_answers = tuneforge.exact_match(make_tiny_model("llama", len(tokenizer)), _templated(copy.deepcopy(tokenizer)),
                                         held_out)["predictions"]
    assert len(held_out) == 4 and all(a.strip() for a in base_answers[:2])
    rows = [json.loads(line) for line in sft_file.read_text().splitlines()]
    for example, answer in zip(held_out[:2], base_answers):
        rows[int(example.source.rsplit(":", 1)[1]) - 1]["output"] = answer  # source: "file:line"
    data = write_jsonl(tmp_path / "with_base_answers.jsonl", rows)
    cfg = config(tmp_path, data, max_steps=4, eval_split=0.25, eval_every=2)
    train_examples, eval_examples = training_examples(cfg)
    result = train(cfg, tokenizer)
    lines = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["grad_norm"] > 0 for m in steps)
    # The first three steps of 4 records are one epoch of the 12 training records, each seen once: the units
    # (supervised tokens) and tokens they log add up to the data's.
    tok = _templated(copy.deepcopy(tokenizer))
    items = [tokenize_chat(tok, e) for e in train_examples]
    assert len(items) == 12
    assert sum(m["units"] for m in steps[:3]) == sum(i.num_supervised for i in items)
    assert sum(m["tokens"] for m in steps[:3]) == sum(len(i.input_ids) for i in items)
    # The rate the scheduler holds after each step: cosine from 1e-2 (no warm-up) to 0 by the last step.
    assert [m["lr"] for m in steps] == pytest.approx([0.5e-2 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)],
                                                     abs=1e-6)
    assert "eval_loss" in steps[1] and "eval_loss" not in steps[0]
    before, final = [m for m in lines if "eval_loss" in m and "loss" not in m]  # before the first step, at the end
    assert final["step"] == 4 and result.metrics["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    assert lines[0] == before and before["step"] == 0  # the baseline comes first
    assert result.metrics["eval_before_loss"] == pytest.approx(before["eval_loss"], abs=1e-6)
    assert final["eval_loss"] < before["eval_loss"]  # four steps at lr 1e-2 learn the tiny eval split's format
    # Chat eval data: exact match of generated answers, before (base) and after training, is logged too.
    assert lines[-1]["exact_match_before"] == result.metrics["exact_match_before"] == 0.5
    after = tuneforge.exact_match(result.model, result.tokenizer, eval_examples)["exact_match"]
    assert lines[-1]["exact_match_after"] == result.metrics["exact_match_after"] == after
    saved = (result.output / "tuneforge.yaml").read_text()
    assert "eval_every: 2" in saved and "max_steps: 4" in saved


def test_eval_before_can_be_turned_off(tmp_path, tokenizer, sft_file):
    result = train(config(tmp_path, sft_file, max_steps=1, eval_split=0.25, eval_before=False,
                          eval_generate=False), tokenizer)
    lines = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 1] and not any(k.startswith("eval_before") for k in result.metrics)


def test_finished_run_is_not_overwritten(tmp_path, tokenizer, sft_file):
    train(config(tmp_path, sft_file, max_steps=1), tokenizer)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train(config(tmp_path, sft_file, max_steps=1), tokenizer)
    before = adapter_tensors(tmp_path / "run")
    train(config(tmp_path, sft_file, max_steps=2, overwrite=True, seed=1), tokenizer)
    after = adapter_tensors(tmp_path / "run")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Overwriting trains from scratch: bit for bit the run the same config makes in an empty directory.
    fresh = train(config(tmp_path, sft_file, "fresh", max_steps=2, seed=1), tokenizer)
    assert after.keys() == adapter_tensors(fresh.output).keys()
    assert all(torch.equal(after[k], v) for k, v in adapter_tensors(fresh.output).items())
    untimed = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics_log(fresh.output)]
    assert [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics_log(tmp_path / "run")] == untimed


def test_batch_size_must_be_a_multiple_of_micro_batch(tmp_path, sft_file):
    with pytest.raises(ValueError, match="batch_size 8 is not a multiple of micro_batch_size 3"):
        tuneforge.load_config(None, {"data": str(sft_file), "batch_size": 8, "micro_batch_size": 3})


def trained_weights(tmp_path, tokenizer, name: str, **changes) -> dict[str, torch.Tensor]:
    """The trainable tensors after 2 LoRA SFT steps of a tiny Llama (no dropout), with ``changes`` to the config."""
    from conftest import qa_rows
    from tuneforge.run.trainer import Trainer, training_examples

    data = write_jsonl(tmp_path / "data.jsonl", qa_rows(8))
    config = tuneforge.load_config(None, dict(model="tiny", data=str(data), max_steps=2, batch_size=4,
                                              output=str(tmp_path / name), eval_generate=False, progress=False,
                                              general_eval="none", eval_before=False,
                                              method_options={"lora_dropout": 0.0}, **changes))
    model = make_tiny_model("llama", len(tokenizer))
    trainer = Trainer(config, model, copy.deepcopy(tokenizer))
    trainer.prepare_data(*training_examples(config))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_every_other_block_and_offloading_activations_keep_the_weights(tmp_path, tokenizer):
    """Memory for time, never different arithmetic: checkpointing half the blocks and keeping saved activations
    in CPU memory train to the weights of a plain run."""
    from tuneforge.run.trainer import checkpoint_blocks

    assert checkpoint_blocks(make_tiny_model("llama", len(tokenizer)), every=2) == [True, False]
    plain = trained_weights(tmp_path, tokenizer, "plain")
    lean = trained_weights(tmp_path, tokenizer, "lean", gradient_checkpointing=True, checkpoint_every=2,
                           offload_activations=True)
    for name, value in plain.items():
        torch.testing.assert_close(lean[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_blocks_train_to_the_eager_weights(tmp_path, tokenizer):
    """--compile: torch.compile of each decoder block (dynamic shapes for packed rows) changes speed, not results."""
    eager = trained_weights(tmp_path, tokenizer, "eager")
    compiled = trained_weights(tmp_path, tokenizer, "compiled", compile=True)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)
