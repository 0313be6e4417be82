"""Choosing a method: ``recommend`` (estimates before anything trains) and ``compare`` (measured runs, several
seeds each, with intervals and a verdict)."""
