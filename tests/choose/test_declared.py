"""recommend asks the method and objective classes (issue 23: no ``== "qlora"``, no hard-coded pair objectives):
a quantised base and the rows per example are declared attributes, read through the registries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuneforge.choose.recommend import ModelShape, estimate_step_seconds, memory_breakdown
from tuneforge.methods.base import METHODS
from tuneforge.objectives.base import OBJECTIVES

CHOOSE = Path(__file__).parents[2] / "src" / "tuneforge" / "choose"


def shape():
    params = 1_000_000_000
    return ModelShape("m", params, int(params * 0.8), 2048, 8192, 16, 128_000,
                      {name: params // 100 for name in METHODS.names()} | {"full": params})


@pytest.mark.parametrize("objective", [o.name for o in OBJECTIVES.classes() if not o.online])
def test_activations_scale_with_each_objectives_rows_per_example(objective):
    one = memory_breakdown(shape(), "lora", "sft", batch_size=2, max_length=256)["activations"]
    mine = memory_breakdown(shape(), "lora", objective, batch_size=2, max_length=256)["activations"]
    assert mine == OBJECTIVES.get(objective).sequences_per_example * one


@pytest.mark.parametrize("method", [m.name for m in METHODS.classes() if m.quantized_base])
def test_a_quantised_base_is_held_in_4_bits_and_costs_dequantising_time(method):
    plain = METHODS.get(method).float_base_method().name
    assert not METHODS.get(plain).quantized_base
    s = shape()
    assert memory_breakdown(s, method, gpu=True)["parameters"] < memory_breakdown(s, plain, gpu=True)["parameters"] / 2
    assert estimate_step_seconds(s, method) == pytest.approx(1.3 * estimate_step_seconds(s, plain))


def test_no_method_or_objective_name_is_compared_as_a_string():
    names = set(METHODS.names()) | set(OBJECTIVES.names())
    pattern = re.compile(r"""[=!]=\s*["']([a-z_]+)["']""")
    found = [(path.name, m.group(1)) for path in CHOOSE.glob("*.py") for m in pattern.finditer(path.read_text())
             if m.group(1) in names]
    assert not found
