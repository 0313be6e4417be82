"""What a run is turned into for deployment: merged models, exports (GGUF, vLLM, Ollama), conversions, and their
verification."""
