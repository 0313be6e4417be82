"""Contracts, not string checks: names resolve through the registries, options are typed and validated before
anything loads, behaviour that depends on a method asks the method, and every option is documented."""

from __future__ import annotations

import copy
import dataclasses

import pytest

import tuneforge
from tuneforge.commands.main import main
from tuneforge.config import ConfigError, RunConfig, load_config
from tuneforge.methods.base import METHODS
from tuneforge.objectives.base import OBJECTIVES

from conftest import make_tiny_model, write_jsonl


def preference_rows(n: int = 8) -> list[dict]:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return [{"prompt": f"Say {i % 10} in words.", "chosen": words[i % 10], "rejected": words[(i + 3) % 10]}
            for i in range(n)]


@pytest.mark.parametrize("alias, canonical", [("full_ft", "full"), ("Full-Finetune", "full"), ("q-lora", "qlora"),
                                              ("prompt-tuning", "prompt_tuning")])
def test_method_aliases_resolve_to_one_name(alias, canonical):
    assert RunConfig(method=alias).method == canonical
    assert load_config(None, {"method": alias}).method == canonical


@pytest.mark.parametrize("alias, canonical", [("rm", "reward"), ("instruction", "sft"),
                                              ("direct-preference-optimization", "dpo"),
                                              ("continued-pretraining", "pretrain")])
def test_objective_aliases_resolve_to_one_name(alias, canonical):
    assert load_config(None, {"objective": alias}).objective == canonical


def test_full_ft_alias_with_dpo_trains_against_a_frozen_copy(tmp_path, tokenizer):
    """The bug this replaced: `--method full_ft` compared as a string reached handle.disabled() on a full handle."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    config = load_config(None, dict(data=str(data), output=str(tmp_path / "run"), method="full_ft", objective="dpo",
                                    max_steps=2, batch_size=4, learning_rate=1e-3, progress=False,
                                    eval_generate=False))
    model = make_tiny_model("llama", len(tokenizer))
    result = tuneforge.train(config, model, copy.deepcopy(tokenizer))
    assert result.steps == 2 and result.metrics["trainable_params"] == result.metrics["total_params"]
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()  # a full model travels with its tokenizer


def test_options_are_validated_before_the_model_loads(tmp_path, capsys):
    # A typo in an SFT option used to be ignored; now it fails before any model is resolved (the model does not
    # even exist) and before the run folder is made.
    code = main(["train", "--data", str(tmp_path / "x.jsonl"), "--model", str(tmp_path / "no-such-model"),
                 "--output", str(tmp_path / "run"), "--sft-train-on-promt", "true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train_on_promt" in err and "train_on_prompt" in err  # names the typo and what is known
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, error", [
    ({"lora_r": "many"}, "r"),
    ({"method": "qlora", "qlora_bnb_4bit_blocksize": 48}, "bnb_4bit_blocksize"),
    ({"dpo_beta": 0.1}, "unknown option(s) for objective 'sft': beta"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"objective": "nope"}, "unknown objective 'nope'"),
])
def test_bad_options_name_themselves(flags, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, flags)


@pytest.mark.parametrize("flag, method, option", [
    ("lora_r", "lora", "r"), ("lora_alpha", "lora", "lora_alpha"), ("qlora_bnb_4bit_quant_type", "qlora",
                                                                      "bnb_4bit_quant_type"),
    ("prompt_num_virtual_tokens", "prompt_tuning", "num_virtual_tokens"),
    ("prompt_tuning_init", "prompt_tuning", "prompt_tuning_init"),
    ("prefix_num_virtual_tokens", "prefix_tuning", "num_virtual_tokens"),
    ("prefix_projection", "prefix_tuning", "prefix_projection"),
    ("p_tuning_v2_num_virtual_tokens", "p_tuning_v2", "num_virtual_tokens"),
    ("p_tuning_encoder_hidden_size", "p_tuning", "encoder_hidden_size"),
])
def test_each_method_declares_its_flag_prefix(flag, method, option):
    routed = METHODS.route(flag)
    assert routed is not None and (routed[0].name, routed[1]) == (method, option)


def test_methods_report_takes_prompt_and_prefix_options(tokenizer):
    """`tuneforge methods --prefix-...` used to be dropped: the prefix was not a registered name."""
    from tuneforge.methods.report import parameter_counts

    model = make_tiny_model("llama", len(tokenizer))
    counts = {}
    for n in (2, 6):
        rows = parameter_counts(model, {METHODS.route("prefix_num_virtual_tokens")[0].name: {
            "num_virtual_tokens": n, "prefix_projection": False}})
        counts[n] = next(r["trainable"] for r in rows if r["method"] == "prefix_tuning")
    assert counts[6] == 3 * counts[2]  # N x layers x 2 x hidden


def test_every_option_is_documented():
    """What `tuneforge train --help` prints: every method's and objective's option with its description."""
    for registry in (METHODS, OBJECTIVES):
        for cls in registry.classes():
            described = cls.config_class.describe()
            assert set(described) == {f.name for f in dataclasses.fields(cls.config_class)}
            undocumented = [name for name, (_, text) in described.items() if not text]
            assert not undocumented, f"{cls.name}: {undocumented}"


def test_behaviour_is_declared_by_the_method_and_objective():
    assert [m.name for m in METHODS.classes() if m.trains_base_weights] == ["full"]
    references = {o.name for o in OBJECTIVES.classes() if o.needs_reference}
    assert {"dpo", "ppo"} <= references and not references & {"sft", "pretrain", "reward"}
    online = {o.name for o in OBJECTIVES.classes() if o.online}
    assert "ppo" in online and not online & {"sft", "pretrain", "reward", "dpo"}


def test_train_help_lists_every_option_under_its_flag():
    from tuneforge.commands.main import _config_help

    text = _config_help()
    for flag in ("--learning-rate", "--lora-r", "--lora-alpha", "--qlora-bnb-4bit-quant-type", "--prefix-projection",
                 "--prompt-tuning-init-text", "--p-tuning-v2-num-virtual-tokens", "--sft-train-on-prompt",
                 "--dpo-beta", "--ppo-kl-coef", "--reward-center-rewards-coefficient"):
        assert f"  {flag} " in text, flag
