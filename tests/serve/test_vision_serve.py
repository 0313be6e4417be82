"""`tuneforge serve` with images: the official openai client sends image_url parts (data URLs); the answer equals
`tuneforge generate --image`'s; remote URLs, oversized images and images for a text-only model are 400s."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import tiny_vlm  # tests/tiny_vlm.py

from tuneforge.commands.main import main

QUESTION = "What colour is the image?"


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, live_server):
    """A tiny Qwen2-VL with a LoRA adapter `colours` (3 training steps) behind a live server."""
    from tuneforge.inference.loading import load_for_inference
    from tuneforge.serve.app import create_app

    root = tmp_path_factory.mktemp("vision-serve")
    base = tiny_vlm.build("qwen2_vl", root / "base")
    rows = []
    for colour in tiny_vlm.COLOURS:
        tiny_vlm.solid(colour).save(root / f"{colour}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "path": f"{colour}.png"},
                                                               {"type": "text", "text": QUESTION}]},
                                  {"role": "assistant", "content": colour}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", str(base), "--data", str(root / "train.jsonl"), "--output", str(root / "run"),
                 "--max-steps", "3", "--batch-size", "2", "--learning-rate", "0.05", "--dtype", "float32",
                 "--progress", "false", "--eval-generate", "false", "--eval-before", "false",
                 "--general-eval", "none"]) == 0
    model, processor, _ = load_for_inference(str(base), None, "cpu", "float32")
    processor.max_image_pixels = 10_000
    app = create_app(model, processor, "base", {"colours": str(root / "run")}, api_key="k")
    with live_server(app) as live:
        yield live, root


@pytest.fixture
def vision_client(vision_server):
    return openai.OpenAI(base_url=vision_server[0].url, api_key="k", max_retries=0, timeout=120)


def test_the_answer_equals_generate_image(vision_server, vision_client, capsys):
    _, root = vision_server
    answers = {}
    for model, target in (("base", ["--model", str(root / "base")]), ("colours", ["--adapter", str(root / "run")])):
        reply = vision_client.chat.completions.create(
            model=model, messages=image_message(data_url(tiny_vlm.solid("blue"))), max_tokens=6, temperature=0)
        assert main(["generate", *target, "--image", str(root / "blue.png"), "--prompt", QUESTION,
                     "--max-new-tokens", "6", "--dtype", "float32"]) == 0
        answers[model] = capsys.readouterr().out.removesuffix("\n")  # the answer alone (it may hold a \r)
        assert reply.choices[0].message.content == answers[model]
    assert answers["base"] and answers["colours"] != answers["base"]  # the adapter was on


@pytest.mark.parametrize("url, why", [
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("data:image/png;base64,AAAA", "cannot read the image"),
    ("LARGE", "over --max-image-pixels 10,000"),
])
def test_bad_images_are_400(vision_client, url, why):
    if url == "LARGE":
        url = data_url(tiny_vlm.solid("red", (200, 200)))
    with pytest.raises(openai.BadRequestError) as caught:
        vision_client.chat.completions.create(model="base", messages=image_message(url), max_tokens=4)
    assert why in str(caught.value)
    assert "messages[0]: image 1:" in str(caught.value)


def test_a_text_only_model_refuses_images(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", max_tokens=4,
                                       messages=image_message(data_url(tiny_vlm.solid("red"))))
    assert "image_url parts need a vision-language model" in str(caught.value)
