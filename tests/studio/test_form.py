"""The training form is generated from the registries: every option of every method and objective appears with its
docstring as help and its annotation as type, and the form validates through the command's own config checks."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from tuneforge.config import RunConfig
from tuneforge.flags import parse_overrides
from tuneforge.methods.base import METHODS
from tuneforge.objectives.base import OBJECTIVES
from tuneforge.options import attribute_docs
from tuneforge.studio.form import NULL, all_fields, check, config_from_tokens, option_fields, run_fields


@pytest.fixture(scope="module")
def fields():
    return all_fields()


def form_values(fields, **changes):
    """The form as it opens, with ``changes`` by flag key (``lora_r=0``)."""
    values = [f.initial() for f in fields]
    for key, value in changes.items():
        index = next(i for i, f in enumerate(fields) if f.key == key)
        values[index] = value
    return values


@pytest.mark.parametrize("kind,registry", [("method", METHODS), ("objective", OBJECTIVES)])
def test_every_registered_option_is_a_field_with_its_help_and_type(fields, kind, registry):
    by_section = {(f.section, f.option): f for f in fields}
    for cls in registry.classes():
        hints = typing.get_type_hints(cls.config_class)
        docs = attribute_docs(cls.config_class)
        for option in (f.name for f in dataclasses.fields(cls.config_class)):
            if option in RunConfig.model_fields:  # seed, max_length_policy: run keys the trainer passes on
                continue
            field = by_section.get((f"{kind}:{cls.name}", option))
            assert field is not None, f"{kind} {cls.name}: option {option} has no field"
            assert field.help == docs[option] and field.help, f"{cls.name}.{option}: help text"
            annotation = hints[option]
            written = annotation.__name__ if isinstance(annotation, type) else str(annotation)
            assert field.type_name == written.replace("typing.", "").replace("NoneType", "None")
            closed = [a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal]
            closed += [annotation] if typing.get_origin(annotation) is typing.Literal else []
            for literal in closed:  # every value of a closed set is a choice of its drop-down
                assert {str(v) for v in typing.get_args(literal)} <= set(field.choices)
            assert field.kind == {bool: "bool", int: "int", float: "float"}.get(annotation, field.kind)
            # The flag the field sends routes back to this very option, as the command line routes it.
            assert registry.route(field.key) == (cls, option) or registry.route(field.key)[1] == option.lower()


def test_every_run_key_but_the_option_mappings_is_a_field():
    names = [f.option for f in run_fields()]
    assert names == [n for n in RunConfig.model_fields if n not in ("method_options", "objective_options")]
    assert all(f.help == RunConfig.model_fields[f.option].description for f in run_fields())


def test_widget_kinds_follow_the_annotations(fields):
    kinds = {(f.section, f.option): (f.kind, f.choices) for f in fields}
    assert kinds["method:lora", "r"] == ("int", ())
    assert kinds["method:lora", "lora_dropout"] == ("float", ())
    assert kinds["method:lora", "use_dora"] == ("bool", ())
    assert kinds["method:lora", "bias"] == ("choice", ("none", "all", "lora_only"))
    assert kinds["method:lora", "init_lora_weights"] == ("choice", ("true", "false", "gaussian", "pissa", "olora"))
    assert kinds["method:lora", "target_modules"] == ("text", ())
    assert kinds["run", "method"] == ("choice", tuple(METHODS.names()))
    assert kinds["run", "distributed"] == ("choice", (NULL, "ddp", "fsdp"))
    assert kinds["run", "max_steps"] == ("text", ())  # optional: an empty box is unset


def test_the_opened_form_is_the_plain_command(fields):
    filled = check(fields, form_values(fields))
    assert filled.error is None and filled.tokens == [] and filled.command == "tuneforge train "


def test_only_changed_values_of_the_chosen_method_and_objective_are_sent(fields):
    values = form_values(fields, lora_r=16, max_steps="3", dpo_beta=0.5, lora_use_dora=False)
    filled = check(fields, values)
    assert filled.tokens == ["--max-steps", "3", "--lora-r", "16"]  # DPO's beta: not the chosen objective
    assert filled.config.method_options["r"] == 16 and filled.config.max_steps == 3


def test_a_command_from_the_form_builds_the_config_the_command_line_builds(fields):
    values = form_values(fields, method="qlora", objective="dpo", qlora_r=4, dpo_beta=0.2,
                         data="pairs.jsonl", learning_rate="1e-4", packing="false", lora_r=99)
    filled = check(fields, values)
    assert filled.error is None
    assert filled.command == ("tuneforge train --method qlora --objective dpo --data pairs.jsonl --learning-rate "
                              "1e-4 --packing false --qlora-r 4 --dpo-beta 0.2")  # LoRA's r: not the chosen method
    from tuneforge.config import load_config

    assert filled.config == load_config(None, parse_overrides(filled.tokens))
    assert "beta: 0.2" in filled.yaml and "method: qlora" in filled.yaml


@pytest.mark.parametrize("key,value,flag,message", [
    ("lora_r", 0, "--lora-r", "lora r must be positive"),
    ("lora_dropout", 1.5, "--lora-dropout", "lora_dropout must be in [0, 1)"),
    ("learning_rate", "-1", "--learning-rate", "greater than 0"),
    ("lora_r", 2.5, "--lora-r", "valid integer"),
    ("max_length", 1, "--max-length", "greater than or equal to 2"),
])
def test_validation_errors_name_the_field(fields, key, value, flag, message):
    filled = check(fields, form_values(fields, **{key: value}))
    assert filled.config is None and message in filled.error
    assert filled.field is not None and filled.field.flag == flag


def test_a_whole_config_error_names_no_field(fields):
    filled = check(fields, form_values(fields, batch_size=3, micro_batch_size="2"))
    assert "not a multiple" in filled.error


def test_without_data_the_form_checks_the_demo_config_as_the_command_does():
    config = config_from_tokens(["--max-steps", "2"])
    assert config.max_steps == 2 and config.learning_rate == 1e-3  # the demo's YAML underneath


def test_option_fields_use_the_flag_prefix():
    keys = {f.key for f in option_fields("method", "p_tuning_v2")}
    assert keys and all(k.startswith("p_tuning_v2_") for k in keys)
    assert {f.key for f in option_fields("method", "lora")} >= {"lora_r", "lora_alpha", "lora_dropout"}
