"""Several data sources mixed by weight (data/mixing.py), the built-in general set, and forgetting measured in
every run (general-text perplexity before and after, in the metrics, metrics.jsonl and summary.json)."""

from __future__ import annotations

import copy
import json

import pytest

import tuneforge
from conftest import make_tiny_model, qa_rows, write_jsonl
from tuneforge.commands.main import parse_overrides
from tuneforge.config import ConfigError, load_config
from tuneforge.data.formats import load_examples
from tuneforge.data.mixing import GENERAL_DIR, DataSource, load_mixed, mix_counts, parse_source

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sources_parse_weights_but_not_hub_splits():
    assert parse_source("a.jsonl:0.8") == DataSource("a.jsonl", 0.8)
    assert parse_source("a.jsonl") == DataSource("a.jsonl")
    assert parse_source("org/set:train") == DataSource("org/set:train")  # a split, not a weight
    assert parse_source("org/set:train:2") == DataSource("org/set:train", 2.0)
    assert parse_source({"path": "general", "weight": 1}) == DataSource("general", 1.0)
    with pytest.raises(ValueError, match="weight must be a positive number"):
        parse_source("a.jsonl:-1")
    with pytest.raises(ValueError, match="needs 'path'"):
        parse_source({"file": "a.jsonl"})


def test_config_accepts_a_list_and_names_a_bad_mix(tmp_path):
    cfg = load_config(None, {"data": ["a.jsonl:0.8", {"path": "general", "weight": 0.2}]})
    assert cfg.data[0] == "a.jsonl:0.8"
    with pytest.raises(ConfigError, match="no weight for b.jsonl"):
        load_config(None, {"data": ["a.jsonl:0.8", "b.jsonl"]})
    assert parse_overrides(["--data", "a.jsonl:0.8", "--data", "general:0.2"])["data"] == ["a.jsonl:0.8",
                                                                                        "general:0.2"]


def test_counts_follow_the_weights_and_add_up():
    assert mix_counts([100, 10], [0.8, 0.2]) == [88, 22]
    assert sum(mix_counts([7, 5, 3], [1, 1, 1])) == 15
    assert mix_counts([7, 5], None) == [7, 5]


def test_mix_is_deterministic_repeats_small_sources_and_reports_counts(tmp_path):
    domain = write_jsonl(tmp_path / "domain.jsonl", [{"text": f"domain {i}"} for i in range(30)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general {i}"} for i in range(4)])
    data = [f"{domain}:0.5", f"{general}:0.5"]
    a, b = load_mixed(data, "auto", seed=1), load_mixed(data, "auto", seed=1)
    assert [e.text for e in a.train] == [e.text for e in b.train]
    assert [e.text for e in load_mixed(data, "auto", seed=2).train] != [e.text for e in a.train]
    assert [s["examples"] for s in a.sources] == [17, 17] and [s["records"] for s in a.sources] == [30, 4]
    replayed = [e.text for e in a.train if e.text.startswith("general")]
    assert len(replayed) == 17 and set(replayed) == {f"general {i}" for i in range(4)}  # each pass is a reshuffle
    for i in range(4):  # draws go pass by pass: no record is taken a second time before all are taken once
        assert replayed.count(f"general {i}") in (4, 5)


def test_eval_split_holds_out_before_mixing(tmp_path):
    domain = write_jsonl(tmp_path / "d.jsonl", [{"text": f"d {i}"} for i in range(20)])
    general = write_jsonl(tmp_path / "g.jsonl", [{"text": f"g {i}"} for i in range(10)])
    data = load_mixed([f"{domain}:1", f"{general}:1"], "auto", seed=0, eval_split=0.2)
    assert len(data.eval) == 6
    assert not {e.text for e in data.eval} & {e.text for e in data.train}


def test_builtin_general_set_ships_with_the_package():
    train, held = load_examples(GENERAL_DIR / "train.jsonl"), load_examples(GENERAL_DIR / "eval.jsonl")
    assert len(train) == 64 and len(held) == 32
    assert all(e.kind == "text" and e.text for e in train + held)
    assert not {e.text for e in train} & {e.text for e in held}


def test_every_run_reports_forgetting_and_the_mix(tmp_path, tokenizer):
    sft = write_jsonl(tmp_path / "sft.jsonl", qa_rows(12))
    more = write_jsonl(tmp_path / "more.jsonl", qa_rows(4))
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."},
                                                       {"text": "Hello! How can I help you today?"}])
    config = tuneforge.load_config(None, {
        "data": [f"{sft}:0.75", f"{more}:0.25"], "general_eval": str(general), "output": str(tmp_path / "run"),
        "max_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "max_length": 64, "progress": False,
        "eval_generate": False, "warmup_steps": 0})
    result = tuneforge.train(config, make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))
    m = result.metrics
    assert m["general_ppl_before"] > 1 and m["general_ppl_after"] > 1
    assert m["forgetting"] == pytest.approx(m["general_loss_after"] - m["general_loss_before"])
    assert m["general_ppl_before"] != m["general_ppl_after"]  # the adapter trained; general text changed
    assert [s["examples"] for s in m["data_sources"]] == [12, 4]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_sources"] for r in logged if "data_sources" in r] == [m["data_sources"]]  # as the README says
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["general_ppl_after"] == pytest.approx(m["general_ppl_after"])


def test_huge_equal_weights_mix_as_equal_weights_and_a_repeated_source_is_said(tmp_path, caplog):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(100)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(14)])
    with caplog.at_level("WARNING", logger="tuneforge.data.mixing"):
        data = load_mixed([f"{big}:1e308", f"{small}:1e308"], "auto", seed=0)
    assert [s["examples"] for s in data.sources] == [57, 57] and len(data.train) == 114
    assert mix_counts([100, 14], [1e308, 1e308]) == mix_counts([100, 14], [1, 1])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and f"data source {small}" in warned[0] and "57 examples from its 14 records" in warned[0]


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e309", "0", "-1"])
def test_a_weight_that_is_not_a_positive_finite_number_is_refused_naming_the_source(weight):
    with pytest.raises(ConfigError, match=rf"data source 'a.jsonl:{weight}': the weight must be a positive number"):
        load_config(None, {"data": [f"a.jsonl:{weight}", "b.jsonl:1"]})


def test_an_integer_weight_past_floats_range_is_refused_not_an_overflow():
    with pytest.raises(ValueError, match="the weight must be a positive number"):
        parse_source({"path": "a.jsonl", "weight": 10 ** 400})
