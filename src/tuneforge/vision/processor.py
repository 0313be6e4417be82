"""A vision-language model's processor as the tokenizer's stand-in: records with images become token ids, labels
and pixel tensors; batches are made by the processor itself.

The answer mask is found as for text (``data.template``): each assistant turn is what the chat template adds after
the prompt's generation prompt, labelled through the tokenizer's offsets on the rendered text. The processor then
expands each image placeholder into the image's tokens (Qwen2-VL: one per merged patch; Idefics3: rows of tiles
between marker tokens; LLaVA: one per patch), and the labels are carried over by aligning the two token sequences:
the processor's is the tokenizer's with tokens inserted, never supervised. Image tokens are never labels, even with
``train_on_prompt``.

No torchvision: transformers' Pillow-backed image processors (``*ImageProcessorPil``) are what ``AutoImageProcessor``
picks without it. Qwen2-VL's processor insists on a video processor, which needs torchvision, so an image-only
subclass stands in for it (the same code expands the image tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.formats import DataError, Example, Message
from ..data.packing import IMAGE_INPUTS
from ..data.template import IGNORE_INDEX, ChatEncoder, Tokenized
from .images import load_images

# Families whose transformers processor also wants a video processor (torchvision): built image-only here, saved
# under their real processor class so that transformers (with torchvision) loads the folder as usual.
IMAGE_ONLY = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def image_only_processor_class(model_type: str) -> type:
    """A subclass of the family's processor that takes no video processor."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = getattr(transformers, IMAGE_ONLY[model_type])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # As Qwen2VLProcessor.__init__, less the video processor.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__})


def processor_class_name(model_type: str) -> str | None:
    return IMAGE_ONLY.get(model_type)


def load_processor(path: str | Path, model_type: str, trust_remote_code: bool = False):
    """The model folder's processor, with Pillow image processing."""
    from transformers import AutoProcessor

    if model_type in IMAGE_ONLY:
        return image_only_processor_class(model_type).from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the processors' chat templates read them: content always a list of parts, images as
    ``{"type": "image"}`` placeholders (the pixels go to the processor separately, in the same order)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                     for p in content]
        out.append({"role": m["role"], "content": parts})
    return out


@dataclass
class ImageTokenized(Tokenized):
    """A record encoded with its images: what ``collate`` hands the processor again for the batch."""

    text: str = ""
    images: list[Any] = field(default_factory=list)


def align_labels(plain_ids: list[int], plain_labels: list[int], expanded_ids: list[int], never: set[int]
                 ) -> list[int]:
    """Labels for ``expanded_ids``, which are ``plain_ids`` with tokens inserted (each image's expansion): every
    plain token is matched, in order, to the next equal expanded token; inserted tokens and ``never`` (the image
    tokens) get no label."""
    labels = [IGNORE_INDEX] * len(expanded_ids)
    k = 0
    for token, label in zip(plain_ids, plain_labels):
        while k < len(expanded_ids) and expanded_ids[k] != token:
            k += 1
        if k == len(expanded_ids):
            raise DataError("the processor's tokens are not the tokenizer's with image tokens inserted; this "
                            "processor is not supported")
        labels[k] = IGNORE_INDEX if token in never else label
        k += 1
    return labels


class VisionProcessor(ChatEncoder):
    """The processor behind the tokenizer's interface (``pad_token_id``, ``decode``, ``chat_template`` ...), plus
    ``encode_chat`` and ``collate`` for records with images."""

    def __init__(self, processor, model_type: str, max_image_pixels: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_type = model_type
        self.max_image_pixels = max_image_pixels
        if self.tokenizer.pad_token_id is None:  # padding carries no loss or attention: EOS is a safe pad
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Token ids that stand for images: never labels, even when the prompt is trained on.
        names = ("image_token", "fake_image_token", "global_image_token", "boi_token", "eoi_token")
        tokens = [getattr(processor, n, None) for n in names]
        self.image_token_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in tokens if isinstance(t, str)}

    # -- the tokenizer's interface, for code that reads text only --------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("processor", "tokenizer"):  # not yet set (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template

    @chat_template.setter
    def chat_template(self, value: str) -> None:
        # The text fallbacks (chatml, alpaca, plain) know no image parts: a VLM keeps the template that places them.
        from ..errors import ConfigError

        raise ConfigError("a vision-language model renders its images with its own chat template; --chat-template "
                          "cannot replace it" + ("" if self.processor.chat_template else " (and this model has none)"))

    def apply_chat_template(self, messages: list[Message], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs) -> str:
        if tokenize:
            raise ValueError("VisionProcessor.apply_chat_template renders text; encode with encode_chat")
        return self.processor.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer, image processor and chat template, as transformers' ``AutoProcessor`` reads them back."""
        self.processor.save_pretrained(directory)
        real = processor_class_name(self.model_type)
        config = Path(directory) / "processor_config.json"
        if real and config.is_file():  # the image-only stand-in is saved under the family's own processor
            data = json.loads(config.read_text())
            data["processor_class"] = real
            config.write_text(json.dumps(data, indent=2) + "\n")

    # -- encoding -------------------------------------------------------------------------------------------
    def inputs(self, texts: list[str], images: list[list[Any]], padding_side: str = "right") -> dict[str, Any]:
        """The processor's batch for rendered ``texts`` and each one's images."""
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "add_special_tokens": False}
        if any(images):
            kwargs["images"] = images
        if len(texts) > 1:
            kwargs.update(padding=True, padding_side=padding_side)
        return dict(self.processor(**kwargs))

    def encode_chat(self, example: Example, train_on_prompt: bool = False, supervise_from: int = 0
                    ) -> ImageTokenized:
        messages = example.messages
        images = load_images(example, messages, self.max_image_pixels)
        text, spans = self.answer_spans(example, supervise_from)
        plain = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [tok if train_on_prompt or any(s <= a < e for s, e in spans) else IGNORE_INDEX
                  for tok, (a, _) in zip(plain["input_ids"], plain["offset_mapping"])]
        expanded = self.inputs([text], [images])["input_ids"][0].tolist()
        try:
            labels = align_labels(plain["input_ids"], labels, expanded, self.image_token_ids)
        except DataError as e:
            raise DataError(f"{example.source}: {e}") from None
        item = ImageTokenized(expanded, labels, example.source, encoder=self, text=text, images=images)
        if item.num_supervised == 0:
            raise DataError(f"{example.source}: the record has no supervised token (no assistant answer)")
        return item

    def answer_spans(self, example: Example, supervise_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (content and closing EOS)."""
        messages = example.messages
        text = self.apply_chat_template(messages)
        eos = self.tokenizer.eos_token or ""
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant" or k < supervise_from:
                continue
            before = self.apply_chat_template(messages[:k], add_generation_prompt=True) if k else ""
            through = self.apply_chat_template(messages[:k + 1])
            if not text.startswith(through) or not through.startswith(before):
                raise DataError(f"{example.source}: the chat template does not render conversations prefix by "
                                "prefix, so the answers cannot be found")
            turn = through[len(before):]
            stop = turn.rfind(eos) if eos else -1
            end = len(before) + stop + len(eos) if stop >= 0 else len(through)
            if stop < 0 and k == len(messages) - 1 and eos:  # the template does not close answers: EOS must
                text += eos
                end = len(text)
            spans.append((len(before), end))
        return text, spans

    def collate(self, examples: list[Tokenized]) -> dict[str, Any]:
        """Right-padded rows made by the processor (its pixel tensors, grids and masks included), with each
        example's labels; every row is checked to hold exactly the tokens the example was encoded to."""
        items = [e for e in examples if isinstance(e, ImageTokenized)]
        if len(items) != len(examples):
            raise TypeError("VisionProcessor.collate takes the examples it encoded")
        batch = self.inputs([e.text for e in items], [e.images for e in items])
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, e in enumerate(items):
            n = len(e.input_ids)
            if ids[row, :n].tolist() != e.input_ids:
                raise RuntimeError(f"{e.source}: the processor batched the record into other tokens than it "
                                   "encoded it alone")
            labels[row, :n] = torch.tensor(e.labels)
        out = {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}
        out.update({key: batch[key] for key in IMAGE_INPUTS if key in batch})
        return out

    def prompt_inputs(self, prompts: list[list[Message]], sources: list[str] | None = None) -> dict[str, Any]:
        """Left-padded generation inputs for prompts (message lists), their images opened and checked."""
        texts, images = [], []
        for i, messages in enumerate(prompts):
            example = Example(sources[i] if sources else f"prompt {i + 1}", "prompt", messages)
            images.append(load_images(example, messages, self.max_image_pixels))
            texts.append(self.apply_chat_template(messages, add_generation_prompt=True))
        return self.inputs(texts, images, padding_side="left")


def with_image_options(tokenizer, images: list[str] | None, max_image_pixels: int | None, prompt: str | None) -> None:
    """``generate --image`` / ``--max-image-pixels``: refused in one line for a text-only model or without a prompt."""
    from ..errors import ConfigError

    if not isinstance(tokenizer, VisionProcessor):
        raise ConfigError("--image needs a vision-language model; this model is text-only (it has no vision tower)")
    if images and prompt is None:
        raise ConfigError("--image goes with --prompt (records in --data carry their own image parts)")
    tokenizer.max_image_pixels = max_image_pixels
