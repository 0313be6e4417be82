"""Methods on vision-language models: LoRA files PEFT loads with the same logits, merge round-trips, which parts
train (--tune-vision / --tune-projector, full fine-tuning), DPO with images."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from tiny_vlm import COLOURS, FAMILIES, solid

from tuneforge.commands.main import main
from tuneforge.data.formats import load_examples
from tuneforge.data.packing import model_inputs
from tuneforge.inference.loading import load_for_inference
from tuneforge.objectives.sft import SFT

QUIET = ["--progress", "false", "--eval-generate", "false", "--eval-before", "false", "--general-eval", "none"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    rows = []
    for colour in COLOURS:
        solid(colour).save(folder / f"{colour}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"{colour}.png"},
                                         {"type": "text", "text": "What colour is the image?"}]},
            {"role": "assistant", "content": colour}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(base, data, output, *extra) -> None:
    code = main(["train", "--model", str(base), "--data", str(data), "--output", str(output), "--max-steps", "3",
                 "--batch-size", "2", "--learning-rate", "0.02", "--dtype", "float32", *QUIET, *extra])
    assert code == 0


def logits_of(model, processor, data) -> torch.Tensor:
    objective = SFT(processor, {})
    batch = objective.collate(objective.prepare(load_examples(data), 512))
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def adapter_keys(run) -> list[str]:
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request, vlm_dir, colour_data, tmp_path_factory):
    base = vlm_dir(request.param)
    run = tmp_path_factory.mktemp(f"lora-{request.param}") / "run"
    train(base, colour_data, run)
    return base, run


def test_lora_loads_in_peft_with_the_same_logits(lora_run, colour_data):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base, run = lora_run
    keys = adapter_keys(run)
    assert keys and all("language_model" in k or "text_model" in k for k in keys)  # the language model only
    model, processor, _ = load_for_inference(str(base), run, "cpu", "float32")
    ours = logits_of(model, processor, colour_data)
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), run).eval()
    theirs = logits_of(peft, processor, colour_data)
    base_logits = logits_of(AutoModelForImageTextToText.from_pretrained(base).eval(), processor, colour_data)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_merge_round_trips(lora_run, colour_data, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, run = lora_run
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(merged)]) == 0
    model, processor, _ = load_for_inference(str(base), run, "cpu", "float32")
    want = logits_of(model, processor, colour_data)
    reloaded = AutoModelForImageTextToText.from_pretrained(merged).eval()  # transformers alone reads the folder
    torch.testing.assert_close(logits_of(reloaded, processor, colour_data), want, rtol=1e-5, atol=1e-5)
    config = json.loads((merged / "processor_config.json").read_text())
    if config["processor_class"] == "Qwen2VLProcessor":  # needs torchvision (its video processor) in transformers
        return
    assert type(AutoProcessor.from_pretrained(merged)).__name__ == config["processor_class"]


@pytest.mark.parametrize("flags, vision, projector", [
    ((), False, False), (("--tune-projector",), False, True), (("--tune-vision",), True, False),
    (("--tune-vision", "--tune-projector"), True, True)])
@pytest.mark.parametrize("family, tower, connector", [("qwen2_vl", ".visual.blocks.", ".visual.merger."),
                                                      ("llava", ".vision_tower.", ".multi_modal_projector.")])
def test_which_parts_lora_trains(vlm_dir, colour_data, tmp_path, flags, vision, projector, family, tower, connector):
    train(vlm_dir(family), colour_data, tmp_path / "run", "--max-steps", "1", *flags)
    keys = adapter_keys(tmp_path / "run")
    assert any(".language_model." in k for k in keys)
    assert any(tower in k for k in keys) == vision
    assert any(connector in k for k in keys) == projector


def test_full_fine_tuning_leaves_the_tower_frozen(vlm_dir, colour_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    base = vlm_dir("idefics3")
    train(base, colour_data, tmp_path / "run", "--method", "full", "--tune-projector", "--learning-rate", "1e-3")
    before = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "run").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".text_model." in k for k in changed) and any(".connector." in k for k in changed)
    assert not any(".vision_model." in k for k in changed)
    assert (tmp_path / "run" / "processor_config.json").is_file()  # the run folder loads on its own


def colour_pairs(folder):
    """Preference records over solid-colour images: the colour's name chosen, the next colour's rejected."""
    rows = []
    for colour, wrong in zip(COLOURS, COLOURS[1:] + COLOURS[:1]):
        solid(colour).save(folder / f"{colour}.png")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image", "path": f"{colour}.png"},
                                                             {"type": "text", "text": "Colour?"}]}],
                     "chosen": colour, "rejected": wrong})
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_dpo_with_images(vlm_dir, tmp_path):
    data = colour_pairs(tmp_path)
    train(vlm_dir("qwen2_vl"), data, tmp_path / "run", "--objective", "dpo", "--max-steps", "4")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "rewards/margins" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy = reference at the first step
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]


def test_eval_scores_records_with_their_images(lora_run, colour_data, capsys):
    base, run = lora_run
    assert main(["eval", "--adapter", str(run), "--data", str(colour_data), "--json", "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, processor, _ = load_for_inference(str(base), run, "cpu", "float32")
    objective = SFT(processor, {})
    batch = objective.collate(objective.prepare(load_examples(colour_data), 512))
    with torch.no_grad():
        loss, _ = objective.loss(model, batch, None)
    assert result["loss"] == pytest.approx(float(loss) / objective.units(batch), rel=1e-5)
    assert 0.0 <= result["exact_match"] <= 1.0 and result["n"] == len(load_examples(colour_data))


@pytest.mark.parametrize("extra", [("--lora-use-dora", "true"), ("--method", "adalora")])
def test_dora_and_adalora_train_the_language_model(vlm_dir, colour_data, tmp_path, extra):
    train(vlm_dir("llava"), colour_data, tmp_path / "run", "--max-steps", "2", *extra)
    keys = adapter_keys(tmp_path / "run")
    assert keys and all(".language_model." in k for k in keys)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_other_pair_objectives_with_images(vlm_dir, tmp_path, objective):
    data = colour_pairs(tmp_path)
    train(vlm_dir("llava"), data, tmp_path / "run", "--objective", objective, "--max-steps", "2")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)  # both sides scored with their images
