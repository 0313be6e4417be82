"""The worked examples of docs/extending.md are real code: a method (docs/examples/ia3.py) and an objective
(docs/examples/hinge.py), each registered through the registry from its own file, trained 2 steps here, from
Python and from the command line, and checked against PEFT (the method) and against its formula (the objective)."""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, train_and_reload, write_jsonl
from tuneforge.commands.main import main
from tuneforge.data.formats import normalise
from tuneforge.data.template import ensure_chat_template
from tuneforge.methods.base import METHODS
from tuneforge.objectives.base import OBJECTIVES, TrainContext

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"
PREFS = [{"prompt": f"Say {i}.", "chosen": "yes indeed", "rejected": "no"} for i in range(8)]


@pytest.fixture
def examples(monkeypatch):
    """Imports the example files, so that their ``@register`` runs, into copies of the registries: after the test
    the registries are as they were, and tests that list every method or objective never meet the examples."""
    for registry in (METHODS, OBJECTIVES):
        registry.names()  # the built-in classes first, into the dictionary that stays
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    modules = {}
    for name in ("ia3", "hinge"):
        sys.modules.pop(name, None)
        modules[name] = importlib.import_module(name)
    yield modules
    for name in modules:
        sys.modules.pop(name, None)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_example_method_trains_reloads_and_loads_in_peft(examples, tmp_path, tokenizer, sft_file):
    from peft import PeftModel

    result = train_and_reload(tmp_path, tokenizer, sft_file, "ia3", {})  # 2 trainer steps, then save and reload
    scales = [p for n, p in result.model.named_parameters() if n.endswith(".ia3_l")]
    assert len(scales) == 3 * 2 and any(not torch.all(s == 1) for s in scales)  # k, v, down_proj in 2 layers
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = make_tiny_model("llama", len(tokenizer))
    with result.handle.disabled():
        assert torch.equal(logits(result.model, ids), logits(base, ids))
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run")  # the oracle reads the example's files
    torch.testing.assert_close(logits(peft_model, ids), logits(result.model, ids), rtol=1e-5, atol=1e-5)


def test_the_example_objective_is_its_formula(examples, tokenizer):
    tok = copy.deepcopy(tokenizer)
    ensure_chat_template(tok)
    hinge = examples["hinge"]
    objective = hinge.Hinge(tok, {"margin": 3.0})
    pairs = [normalise(row, "preference", f"p:{i}") for i, row in enumerate(PREFS[:2])]
    batch = objective.collate(objective.prepare(pairs, 64))
    model = make_tiny_model("llama", len(tok))
    loss, metrics = objective.loss(model, batch, TrainContext())
    with torch.no_grad():  # the answers' log-probabilities, summed over their supervised tokens, by hand
        logps = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        labels = batch["labels"][:, 1:]
        supervised = labels != -100
        token_logps = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * supervised
        chosen, rejected = token_logps.sum(-1).chunk(2)
    torch.testing.assert_close(loss, torch.relu(3.0 - (chosen - rejected)).sum(), rtol=1e-5, atol=1e-5)
    assert objective.units(batch) == 2 and int(metrics["accuracy"]) == int((chosen > rejected).sum())


def test_both_examples_train_from_the_command_line(examples, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run), "--max-steps", "2",
            "--batch-size", "4", "--progress", "false", "--method", "ia3", "--ia3-target-modules", "[q_proj, v_proj]",
            "--objective", "hinge", "--hinge-margin", "2"]
    assert main(args) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["units"] == 4 and "accuracy" in r for r in steps)
    assert steps[1]["loss"] < steps[0]["loss"]  # pairs still short of the margin: the scales moved the right way
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["target_modules"] == ["q_proj", "v_proj"]
    capsys.readouterr()
    bad = [*args[:-1], "-1", "--output", str(tmp_path / "bad")]  # --hinge-margin -1: refused before anything loads
    assert main(bad) == 2 and "margin" in capsys.readouterr().err and not (tmp_path / "bad").exists()
