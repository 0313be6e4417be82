"""One shared check, run over every registered method (new methods are picked up automatically):

attach to a tiny Llama → trainable parameters > 0, the base frozen → 3 AdamW steps of the SFT loss (with the
trainer's hooks) lower the loss and leave every frozen tensor bit-identical → ``disabled()`` gives the base
model's logits exactly → ``handle.save(dir)`` + ``load_adapter`` on a fresh model gives the trained logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, qa_rows
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods import get_method, method_for_adapter
from tuneforge.objectives import TrainContext, get_objective

pytestmark = pytest.mark.usefixtures("single_thread")

# Methods that only run on a GPU (none today). Anything listed here is skipped on CPU-only machines.
GPU_ONLY: set[str] = set()
# Learning rate of the 3 check steps, where a method needs another than the default.
LEARNING_RATE = {"full": 2e-3}
DEFAULT_LR = 1e-2


def method_params():
    return [pytest.param(name, marks=pytest.mark.skipif(name in GPU_ONLY and not torch.cuda.is_available(),
                                                         reason=f"{name} needs a GPU"))
            for name in tuneforge.available_methods()]


@pytest.fixture(scope="module")
def sft_batch(tokenizer):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    objective = get_objective("sft")(tok)
    examples = [normalise(row, "alpaca", f"qa:{i + 1}") for i, row in enumerate(qa_rows(8))]
    items = objective.prepare(examples, 64)
    return tok, objective, objective.collate(items)


def sft_loss(objective, model, batch, ctx) -> torch.Tensor:
    loss_sum, _ = objective.loss(model, batch, ctx)
    return loss_sum / objective.units(batch)


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def is_quantised(model) -> bool:
    return any(type(p).__name__ == "Params4bit" or not p.dtype.is_floating_point for p in model.parameters())


@pytest.mark.parametrize("name", method_params())
def test_method_contract(name, sft_batch, tmp_path):
    tok, objective, batch = sft_batch
    method = get_method(name)
    model = make_tiny_model("llama", len(tok))
    before_attach = logits(model, batch)
    original_params = list(model.parameters())  # kept alive, so their ids are not reused by new tensors
    original = {id(p) for p in original_params}

    handle = method.attach(model, method.config_class())
    handle.begin_training(3)  # the trainer calls this before training (AdaLoRA's schedule needs it)
    trainable = handle.trainable_parameters()
    assert handle.num_trainable_parameters() == sum(p.numel() for _, p in trainable) > 0
    assert all(p.requires_grad for _, p in trainable)
    trainable_ids = {id(p) for _, p in trainable}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable_ids}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    if name != "full":
        assert frozen and not trainable_ids & original  # new tensors train; every base tensor is frozen

    # The base the adapter is measured against: the untouched model, or its 4-bit version (QLoRA quantises).
    quantised = is_quantised(model)
    if name != "full":
        with handle.disabled():
            base_logits = logits(model, batch)
        if not quantised:
            assert torch.equal(base_logits, before_attach)
    ctx = TrainContext(handle=handle)
    with torch.no_grad():
        loss_before = sft_loss(objective, model.eval(), batch, ctx).item()

    # -- 3 AdamW steps, with the calls the trainer makes ------------------------------------------------
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=LEARNING_RATE.get(name, DEFAULT_LR))
    model.train()
    for step in range(3):
        loss = sft_loss(objective, model, batch, ctx)
        extra = handle.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        handle.after_backward(step)
        optimizer.step()
        handle.after_step(step)
        optimizer.zero_grad(set_to_none=True)
    trained = logits(model, batch)
    with torch.no_grad():
        loss_after = sft_loss(objective, model, batch, ctx).item()
    assert trained.shape == before_attach.shape  # virtual tokens, if any, never reach the caller
    assert not torch.allclose(trained, before_attach, atol=1e-6), "training did not change the output"
    assert loss_after < loss_before, (loss_before, loss_after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen tensor {n} changed"

    if name == "full":  # every weight changed: no disabled(), and the result is a whole HF model
        from transformers import AutoModelForCausalLM

        handle.save(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(logits(reloaded, batch), trained)
        return

    # -- disabled() is the base model, exactly; the adapter comes back after the context --------------------
    with handle.disabled():
        assert torch.equal(logits(model, batch), base_logits)
    assert torch.equal(logits(model, batch), trained)

    # -- save, then load into a fresh model -----------------------------------------------------------------
    handle.save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert method_for_adapter(tmp_path).name == method.name
    fresh = make_tiny_model("llama", len(tok))
    loaded = tuneforge.load_adapter(fresh, tmp_path)
    assert loaded.num_trainable_parameters() <= handle.num_trainable_parameters()
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-6, rtol=1e-6)
    with loaded.disabled():
        assert torch.equal(logits(fresh, batch), base_logits)


def test_every_method_is_listed():
    names = tuneforge.available_methods()
    assert {"full", "lora"} <= set(names)
    for name in names:  # each resolves by name, with hyphens too
        assert get_method(name.replace("_", "-")).name == name
