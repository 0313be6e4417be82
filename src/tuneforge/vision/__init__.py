"""Vision-language models through the one trainer: images in records, the model's own processor, the same loop.

``loading``: is a model folder a VLM, and load it with its processor; ``processor``: records with images as tokens,
labels and pixel tensors (the processor is the tokenizer's stand-in, ``data.template.ChatEncoder``); ``images``:
image parts opened with Pillow, checked before training; ``scope``: which parts of the model a method trains
(the language model by default; ``--tune-vision`` / ``--tune-projector``); ``generate``: answers to prompts with
images. No torchvision: transformers' Pillow-backed image processors do the resizing (docs/vision.md).
"""
