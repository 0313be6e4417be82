"""Bad input with images: one line naming the file, the line and the image, exit 2, before any training step."""

from __future__ import annotations

import json

import pytest
from tiny_vlm import solid

from tuneforge.commands.main import main

QUIET = ["--max-steps", "1", "--batch-size", "1", "--progress", "false", "--eval-generate", "false",
         "--eval-before", "false", "--general-eval", "none"]


def record(image_part: dict, answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [image_part, {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture
def data(tmp_path):
    solid("red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")

    def write(*parts: dict):
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(record(p)) + "\n" for p in parts))
        return path

    return write


def train(capsys, model, data, *extra) -> tuple[int, str]:
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(data.parent / "run"),
                 *QUIET, *extra])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("part, why", [
    ({"type": "image", "path": "missing.png"}, "image 1: file not found: "),
    ({"type": "image", "path": "broken.png"}, "image 1: cannot read the image"),
    ({"type": "image", "base64": "not base64!"}, "image 1: not valid base64"),
    ({"type": "image", "url": "https://example.com/cat.png"}, "image 1: remote image URLs are not fetched"),
])
def test_an_unusable_image_names_the_record_and_the_image(capsys, vlm_dir, data, part, why):
    path = data({"type": "image", "path": "red.png"}, part)
    code, line = train(capsys, vlm_dir("qwen2_vl"), path)
    assert code == 2
    assert line.startswith(f"tuneforge: error: {path}:2: {why}")
    assert not (path.parent / "run" / "metrics.jsonl").exists()


def test_too_many_pixels(capsys, vlm_dir, data):
    code, line = train(capsys, vlm_dir("qwen2_vl"), data({"type": "image", "path": "red.png"}),
                       "--max-image-pixels", "1000")
    assert code == 2
    assert line.endswith(":1: image 1: 40x36 = 1,440 pixels, over --max-image-pixels 1,000")


def test_a_malformed_part(capsys, vlm_dir, data):
    code, line = train(capsys, vlm_dir("qwen2_vl"), data({"type": "image", "path": "red.png", "url": "x"}))
    assert code == 2
    assert "train.jsonl:1: field 'messages[0]'.content[0]: an image part needs exactly one of" in line


def test_an_image_for_a_text_only_model(capsys, tiny_model_dir, data):
    code, line = train(capsys, tiny_model_dir, data({"type": "image", "path": "red.png"}))
    assert code == 2
    assert "train.jsonl:1: the record has images, but the model is text-only" in line


def test_packing_is_refused_with_the_reason(capsys, vlm_dir, data):
    code, line = train(capsys, vlm_dir("qwen2_vl"), data({"type": "image", "path": "red.png"}), "--packing", "true")
    assert code == 2
    assert "multimodal rotary position ids are computed per example" in line


def test_virtual_token_methods_are_refused(capsys, vlm_dir, data):
    code, line = train(capsys, vlm_dir("llava"), data({"type": "image", "path": "red.png"}),
                       "--method", "prompt_tuning")
    assert code == 2
    assert "prompt_tuning is not supported on vision-language models" in line


def test_generate_image_on_a_text_only_model(capsys, tiny_model_dir, data):
    data({"type": "image", "path": "red.png"})
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "Colour?", "--image",
                 str(tiny_model_dir / "config.json")])
    assert code == 2
    assert "--image needs a vision-language model" in capsys.readouterr().err


def test_streaming_reads_images_relative_to_the_file(capsys, vlm_dir, data, tmp_path):
    path = data({"type": "image", "path": "red.png"}, {"type": "image", "path": "red.png"})
    code = main(["train", "--model", str(vlm_dir("qwen2_vl")), "--data", str(path), "--streaming", "--output",
                 str(tmp_path / "run"), *QUIET])
    assert code == 0, capsys.readouterr().err


def test_a_text_chat_template_is_refused(capsys, vlm_dir, data):
    path = data({"type": "image", "path": "red.png"})
    code, line = train(capsys, vlm_dir("llava"), path, "--chat-template", "chatml")
    assert code == 2
    assert "renders its images with its own chat template" in line
