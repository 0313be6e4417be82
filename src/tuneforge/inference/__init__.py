"""Using a trained model: loading base + adapter, generation, held-out metrics, lm-eval benchmarks."""
