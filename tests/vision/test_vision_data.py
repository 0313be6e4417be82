"""Records with images: the answer mask, the loss against transformers' own forward, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_vlm import FAMILIES, solid

from tuneforge.data.formats import load_examples
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.models.loading import load_model
from tuneforge.objectives.sft import SFT


def user(image: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision-data")
    (folder / "img").mkdir()
    solid("red").save(folder / "img" / "red.png")
    solid("blue", (50, 30)).save(folder / "img" / "blue.png")
    rows = [
        {"messages": [user("img/red.png", "What colour?"), {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "system", "content": "Answer in one word."}, user("img/blue.png", "Colour?"),
                      {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes blue"}]},
    ]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, vlm_dir):
    model, processor = load_model(str(vlm_dir(request.param)), device="cpu", dtype="float32")
    return request.param, model, processor


def test_paths_are_relative_to_the_data_file(records):
    example = load_examples(records)[0]
    assert example.messages[0]["content"][0]["path"] == str(records.parent / "img" / "red.png")


def test_mask_covers_exactly_the_answer_tokens(family_model, records):
    family, _, processor = family_model
    items = SFT(processor, {}).prepare(load_examples(records), 512)
    tok = processor.tokenizer
    for item, answers in zip(items, (["red"], ["blue", "yes blue"])):
        labelled = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
        # Each answer and its closing end-of-turn token, in order, nothing else.
        want = [t for a in answers for t in tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]]
        assert [item.labels[i] for i in labelled] == want
        assert all(item.labels[i] == item.input_ids[i] for i in labelled)
        assert not set(labelled) & {i for i, t in enumerate(item.input_ids) if t in processor.image_token_ids}
        # The last answer ends the sequence but for the template's newline after its end-of-turn token.
        assert labelled[-1] == len(item.input_ids) - 2
    image_tokens = sum(t in processor.image_token_ids for t in items[0].input_ids)
    # The image's tokens: many where its features replace them, one where cross-attention reads it (Mllama).
    assert image_tokens == 1 if family == "mllama" else image_tokens > 1


def test_loss_equals_transformers_forward_with_hand_built_labels(family_model, records):
    family, model, processor = family_model
    objective = SFT(processor, {})
    examples = load_examples(records)
    batch = objective.collate(objective.prepare(examples, 512))
    ours, _ = objective.loss(model, batch, None)
    # Hand-built: the processor's own batch, labels on each answer's tokens found by searching for them.
    from PIL import Image

    tok = processor.tokenizer
    texts = [processor.apply_chat_template(e.messages) for e in examples]
    images = [[Image.open(p["path"]).convert("RGB")] for e in examples for m in e.messages[:2]
              if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    inputs = processor.processor(text=texts, images=images, padding=True, padding_side="right",
                                 add_special_tokens=False, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    for row, answers in enumerate((["red"], ["blue", "yes blue"])):
        ids = inputs["input_ids"][row].tolist()
        start = 0
        for answer in answers:
            want = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
            at = next(i for i in range(start, len(ids)) if ids[i:i + len(want)] == want)
            labels[row, at:at + len(want)] = torch.tensor(want)
            start = at + len(want)
    reference = model(**inputs, labels=labels).loss
    units = objective.units(batch)
    assert units == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours / units, reference, rtol=1e-5, atol=1e-6)


def test_the_image_reaches_the_model(family_model, records, tmp_path):
    family, model, processor = family_model
    objective = SFT(processor, {})
    example = load_examples(records)[0]
    losses = []
    for colour in ("red", "green"):
        solid(colour).save(tmp_path / "x.png")
        example.messages[0]["content"][0]["path"] = str(tmp_path / "x.png")
        batch = objective.collate(objective.prepare([example], 512))
        losses.append(float(objective.loss(model, batch, None)[0].detach()))
    assert losses[0] != losses[1]


def test_preview_shows_image_tokens_as_a_count(vlm_dir, records, capsys):
    from tuneforge.commands.main import main

    assert main(["data", "preview", str(records), "--model", str(vlm_dir("qwen2_vl"))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"<\|vision_start\|><\|image_pad\|>x\d+<\|vision_end\|>What colour\?", out)
    assert "[[red<|im_end|>]]" in out


def test_train_on_prompt_never_labels_image_tokens(family_model, records):
    _, _, processor = family_model
    item = SFT(processor, {"train_on_prompt": True}).prepare(load_examples(records), 512)[0]
    images = [i for i, t in enumerate(item.input_ids) if t in processor.image_token_ids]
    assert images and all(item.labels[i] == IGNORE_INDEX for i in images)
    assert sum(label != IGNORE_INDEX for label in item.labels) > len(item.input_ids) // 3  # the prompt's text is
