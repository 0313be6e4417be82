"""Choosing a method: the memory/time model behind ``recommend`` (estimates before anything trains, measured numbers
once runs exist), and ``compare`` across methods (several seeds each, intervals, a verdict)."""
