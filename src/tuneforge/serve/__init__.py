"""``tuneforge serve``: an OpenAI-compatible server for one base model and many adapters over it.

``app.py`` (HTTP routes, errors, auth, body limits) -> ``scheduler.py`` (bounded queue, batching, cancellation) ->
``engine.py`` (the token loop of one batch) with ``registry.py`` (adapters by name) and ``inference/multi_lora.py``
(LoRA per
batch row); ``defaults.py`` holds the default limits.
FastAPI and uvicorn come with the ``serve`` extra. Nothing is imported here, so ``tuneforge --help`` works without
them; ``from tuneforge.serve.app import create_app`` is the entry point.
"""
