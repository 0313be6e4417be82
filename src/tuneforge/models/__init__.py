"""Base models: resolving a name to weights, loading, hub rules, optional GPU kernels."""
