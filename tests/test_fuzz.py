"""Property-based fuzzing (hypothesis) of what reads user input: the data loaders (random bytes as JSONL / JSON / CSV,
random records through detection and normalisation) and the command line's flag parser and config loader (random
keys and values). The property: only the documented errors escape — ValueError and its subclasses (DataError,
ConfigError), FileNotFoundError — never a TypeError, KeyError, RecursionError or other traceback.

Deterministic (derandomize) so CI sees the same examples every run; no deadline, since a busy shared CPU is slow.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.flags import parse_overrides, parse_value
from tuneforge.config import RunConfig, load_config
from tuneforge.data.formats import FORMATS, Example, detect_format, load_examples, normalise

DOCUMENTED = (ValueError, FileNotFoundError)  # DataError and ConfigError are ValueErrors
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Record keys the loaders look at, so random records reach every branch, plus a few they do not know.
DATA_KEYS = ["instruction", "input", "output", "system", "history", "messages", "conversations", "text", "prompt",
             "chosen", "rejected", "completion", "label", "role", "content", "from", "value", "data", "x"]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) \
    | st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot", "true", "false", ""])
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(DATA_KEYS) | st.text(max_size=5),
                                                                inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values,
                                                        "from": json_values, "value": json_values}), max_size=4)
records = st.dictionaries(st.sampled_from(DATA_KEYS), json_values | messages, max_size=6)


def loads_or_documented_error(path: Path, fmt: str | None = None) -> list[Example] | None:
    try:
        return load_examples(path, fmt)
    except DOCUMENTED as e:
        if fmt in (None, "auto") or fmt in FORMATS:  # an unknown format name is an error about the argument
            assert str(path) in str(e), f"the error does not name the file: {e}"
        assert "\n" not in str(e), f"not a one-line error: {e!r}"
        return None


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:  # hypothesis reruns a test body; pytest's tmp_path is per test
        yield Path(d)


# -- data loaders ------------------------------------------------------------------------------------------------


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_random_bytes_in_any_data_file(workdir, content, suffix):
    path = workdir / f"random{suffix}"
    path.write_bytes(content)
    loads_or_documented_error(path)


@pytest.mark.slow  # 150 examples each: 30-75 s
@FUZZ
@given(lines=st.lists(st.one_of(records.map(json.dumps), st.text(max_size=40),
                                st.binary(max_size=20).map(lambda b: b.decode("latin-1"))), min_size=1, max_size=5),
       fmt=st.none() | st.sampled_from(FORMATS) | st.text(max_size=6))
def test_random_jsonl_lines_and_formats(workdir, lines, fmt):
    path = workdir / "lines.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    examples = loads_or_documented_error(path, fmt)
    for ex in examples or []:
        assert ex.source.startswith(f"{path}:")  # every record knows its line


@pytest.mark.slow  # 150 examples each: 30-75 s
@FUZZ
@given(row=records, fmt=st.sampled_from(FORMATS))
def test_random_records_through_detection_and_every_format(row, fmt):
    try:
        detect_format(row, "rec:1")
    except DOCUMENTED:
        pass
    try:
        example = normalise(row, fmt, "rec:1")
    except DOCUMENTED:
        return
    # What normalisation promises: messages are role/content string pairs with known roles.
    for message in example.messages + example.chosen + example.rejected:
        assert message["role"] in ("system", "user", "assistant") and isinstance(message["content"], str)


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=8), max_size=5), min_size=1, max_size=5))
def test_random_csv_cells(workdir, rows):
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path = workdir / "cells.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    loads_or_documented_error(path)


@pytest.mark.slow  # 150 examples each: 30-75 s
@FUZZ
@given(records=st.lists(records, min_size=1, max_size=3), wrap=st.booleans())
def test_random_json_files(workdir, records, wrap):
    path = workdir / "records.json"
    path.write_text(json.dumps({"data": records} if wrap else records))
    loads_or_documented_error(path)


# -- the flag parser and the config loader ---------------------------------------------------------------------

RUN_KEYS = sorted(RunConfig.model_fields)
OPTION_FLAGS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "qlora_r", "adalora_init_r",
                "prompt_tuning_num_virtual_tokens", "prefix_num_virtual_tokens", "dpo_beta", "ppo_kl_coef",
                "adapter_reduction_factor"]
flag_text = st.text(alphabet=string.printable, max_size=16)
config_keys = st.sampled_from(RUN_KEYS + OPTION_FLAGS) | st.text(alphabet=string.ascii_lowercase + "_-", max_size=12)
config_values = json_values | flag_text.map(parse_value) | st.sampled_from(
    ["lora", "qlora", "full", "adalora", "sft", "dpo", "ppo", "pretrain", "reward", "-1", "0", "1e9", "nan", "inf"]
).map(parse_value)


@FUZZ
@given(text=st.text(max_size=30))
def test_parse_value_never_raises(text):
    value = parse_value(text)
    assert value is not text or isinstance(value, str)


@FUZZ
@given(pairs=st.lists(st.tuples(config_keys, flag_text), max_size=5), bare=st.booleans())
def test_parse_overrides_of_random_flags(pairs, bare):
    tokens = []
    for key, value in pairs:
        tokens += [f"--{key}"] + ([] if bare and not value else [value if not value.startswith("--") else "x"])
    overrides = parse_overrides(tokens)
    assert set(overrides) <= {key.replace("-", "_").partition("=")[0] for key, _ in pairs}


@FUZZ
@given(overrides=st.dictionaries(config_keys, config_values, max_size=5))
def test_load_config_with_random_keys_and_values(overrides):
    try:
        load_config(None, overrides)
    except DOCUMENTED:
        pass


@FUZZ
@given(content=st.one_of(st.text(max_size=80), st.dictionaries(config_keys, config_values, max_size=5).map(
    lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_load_config_from_a_random_yaml_file(workdir, content):
    path = workdir / "run.yaml"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, {})
    except DOCUMENTED:
        pass
