"""A custom metric for `tuneforge prompt eval --metric examples/prompting/first_word_metric.py:first_word`.

A metric is any function ``(prediction, reference) -> float`` in [0, 1]. This one forgives a model that adds
an explanation after the label: only the first word of the prediction is compared.
"""

import re


def first_word(prediction: str, reference: str) -> float:
    words = re.findall(r"[\w'-]+", prediction.casefold())
    return float(bool(words) and words[0] == reference.strip().casefold())
