"""Tiny random vision-language models built from configs, saved as model folders with their processors.

One tiny byte-level BPE tokenizer (trained in milliseconds on a few sentences) with each family's image tokens, a
ChatML chat template that places each family's image placeholder, and a few-thousand-parameter model per family:
Qwen2-VL (patch merger, multimodal rotary ids), Idefics3 (pixel-shuffle connector), LLaVA (projector), Mllama
(cross-attention layers).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2_vl", "idefics3", "llava", "mllama")
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30)}

SPECIALS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"],
    "llava": ["<image>"],
    "mllama": ["<|image|>", "<|begin_of_text|>", "<|python_tag|>"],
}
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "idefics3": "<image>", "llava": "<image>",
               "mllama": "<|image|>"}


def chat_template(placeholder: str, bos: str = "") -> str:
    return (bos + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + placeholder +
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPECIALS[family]]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What colour is the image? It is " + " ".join(COLOURS) + ". Describe the picture. user assistant"]
    tok.train_from_iterator(corpus * 20, trainer)
    bos = {"bos_token": "<|begin_of_text|>"} if family == "mllama" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **bos)


def text_config(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, **extra)


def build(family: str, directory: Path, seed: int = 0) -> Path:
    """A tiny random ``family`` model and its processor saved in ``directory``."""
    import transformers as tr

    tokenizer = tiny_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS[family]}
    template = chat_template(PLACEHOLDER[family], "<|begin_of_text|>" if family == "mllama" else "")
    vocab = len(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if family == "qwen2_vl":
        from tuneforge.vision.processor import image_only_processor_class
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = tr.Qwen2VLConfig(
            text_config=text_config(vocab, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                                    eos_token_id=eos, bos_token_id=eos, pad_token_id=pad),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, patch_size=14, merge_size=2,
                                          temporal_patch_size=2)
        processor = image_only_processor_class("qwen2_vl")(image_processor=images, tokenizer=tokenizer,
                                                           chat_template=template)
        model_class = tr.Qwen2VLForConditionalGeneration
    elif family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = tr.Idefics3Config(
            text_config=dict(model_type="llama", **text_config(vocab, eos_token_id=eos, pad_token_id=pad)),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            scale_factor=2, image_token_id=ids["<image>"], pad_token_id=pad, tie_word_embeddings=False)
        images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                           max_image_size={"longest_edge": 32})
        processor = tr.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                         chat_template=template)
        model_class = tr.Idefics3ForConditionalGeneration
    elif family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = tr.LlavaConfig(
            text_config=dict(model_type="llama", **text_config(vocab, eos_token_id=eos, pad_token_id=pad)),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=32),
            image_token_id=ids["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", tie_word_embeddings=False)
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = tr.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=template)
        model_class = tr.LlavaForConditionalGeneration
    elif family == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        config = tr.MllamaConfig(
            text_config=text_config(vocab, cross_attention_layers=[1], eos_token_id=eos, pad_token_id=pad,
                                    bos_token_id=tokenizer.bos_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                               attention_heads=2, image_size=28, patch_size=14, max_num_tiles=1,
                               intermediate_layers_indices=[0], vision_output_dim=64,
                               supported_aspect_ratios=[[1, 1]]),
            image_token_index=ids["<|image|>"])
        images = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=1)
        processor = tr.MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)
        model_class = tr.MllamaForConditionalGeneration
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # Mllama's cross-attention gates start closed (tanh(0)): open them, or images do nothing
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if family == "qwen2_vl":  # the image-only stand-in saved under the family's own processor class
        import json

        file = directory / "processor_config.json"
        data = json.loads(file.read_text())
        data["processor_class"] = "Qwen2VLProcessor"
        file.write_text(json.dumps(data))
    return directory


def solid(colour: str, size: tuple[int, int] = (40, 36)):
    from PIL import Image

    return Image.new("RGB", size, RGB[colour])


def colour_task(folder: Path, n: int, seed: int, blank: bool = False) -> Path:
    """``n`` records "what colour is this image?" -> the colour's name, balanced over ``COLOURS``, each image a
    solid colour with its own shade and size. ``blank``: every image the same grey (the control that shows the
    answers come from the pixels, not from the text)."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        shade = (128, 128, 128) if blank else tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in RGB[colour])
        name = f"{seed}-{i}.png"
        Image.new("RGB", (rng.randint(24, 64), rng.randint(24, 64)), shade).save(folder / name)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": name},
                                         {"type": "text", "text": "What colour is the image?"}]},
            {"role": "assistant", "content": colour}]})
    path = folder / f"colours-{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
