"""Choosing a method: the memory/time model behind ``recommend``, and ``compare`` across methods."""
