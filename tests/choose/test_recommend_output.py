"""``tuneforge recommend`` read as a user reads it: the printed table, verdict and command parsed back, for the
cases that used to contradict themselves (issue 28): an 8B model on one 24 GB GPU, ``--cpu``, a folder holding only
config.json; and a machine whose runs measured more than the model estimates."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from tuneforge.choose.recommend import Setup, estimate_memory_mb, model_shape
from tuneforge.commands.main import main
from tuneforge.flags import parse_overrides

ROW = re.compile(r"^(?P<method>\S+)\s+(?P<middle>.+?)\s+(?P<mb>[\d,]+) MB\s+(?P<s>\S+)\s+(?P<fits>yes|no)?\s*"
                 r"(?P<basis>estimate|measured)$")


def run(capsys, *flags: str) -> dict:
    """The printed report, parsed: usable MB, the table rows, the configurations tried, the verdict, the command."""
    assert main(["recommend", "--runs", "", *flags]) == 0
    out = capsys.readouterr().out
    usable = re.search(r": ([\d,]+) MB usable of", out)
    sections = out.split("\n\n")
    table = [ROW.match(line).groupdict() for line in sections[1].splitlines()[1:]]
    tried = [ROW.match(line).groupdict() for line in sections[2].splitlines()[2:] if ROW.match(line)]
    verdict = re.search(r"^recommended: (.*)$", out, re.M).group(1)
    command = out.split("run:\n", 1)[1].strip() if "run:\n" in out else None
    return {"out": out, "usable": float(usable.group(1).replace(",", "")) if usable else None, "table": table,
            "tried": tried, "verdict": verdict, "command": command}


def mb(row: dict) -> int:
    return int(row["mb"].replace(",", ""))


def check_the_verdict_agrees_with_the_tables(report: dict) -> None:
    for row in report["table"] + report["tried"]:  # "fits" is the usable memory, nothing hidden
        assert (row["fits"] == "yes") == (mb(row) <= report["usable"]), row
    chosen = [r for r in report["tried"] if r["fits"] == "yes"]
    method = report["verdict"].split(" with ", 1)[1].split(",", 1)[0]
    assert any(r["method"] == method for r in chosen), (method, chosen)
    assert "exceeds" not in report["out"]


def command_setup(command: str) -> tuple[str, Setup]:
    flags = parse_overrides(shlex.split(command)[2:])
    batch = flags["batch_size"]
    return flags["method"], Setup(batch, flags.get("micro_batch_size", batch), flags["max_length"],
                                  flags.get("gradient_checkpointing", False))


@pytest.fixture(scope="module")
def llama_8b_config_only(tmp_path_factory):
    """Llama-3.1-8B's published shape as a folder with config.json and no weights: enough for an estimate."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return folder


def test_8b_on_one_24gb_gpu_prints_exactly_the_configuration_it_estimated(llama_8b_config_only, capsys):
    report = run(capsys, "--model", str(llama_8b_config_only), "--gpu-memory", "24GB", "--gpu", "4090")
    assert report["usable"] == pytest.approx(24 * 1024 * 0.9, abs=1)
    check_the_verdict_agrees_with_the_tables(report)
    assert "asked: batch 8 x 512 tokens" in report["out"]  # train's defaults, not 4 x 512
    method, setup = command_setup(report["command"])
    chosen = next(r for r in report["tried"] if r["fits"] == "yes" and r["method"] == method
                  and r["middle"].strip() == setup.describe())
    shape = model_shape(str(llama_8b_config_only), (method,))
    assert round(estimate_memory_mb(shape, method, "sft", gpu=True, batch_size=setup.micro_batch_size,
                                    max_length=setup.max_length,
                                    gradient_checkpointing=setup.gradient_checkpointing)) == mb(chosen)
    assert setup.gradient_checkpointing and "--gradient-checkpointing true" in report["command"]
    full = next(r for r in report["table"] if r["method"] == "full")
    assert mb(full) > 16 * 8_030_261_248 / 2**20  # float32 weights, gradients, AdamW moments, then activations
    assert "16 bytes per parameter" in report["out"]


def test_batch_size_one_is_kept_in_the_command(llama_8b_config_only, capsys):
    report = run(capsys, "--model", str(llama_8b_config_only), "--gpu-memory", "24GB", "--batch-size", "1")
    check_the_verdict_agrees_with_the_tables(report)
    method, setup = command_setup(report["command"])
    assert setup.batch_size == 1 and "--batch-size 1 " in report["command"]
    assert "give --gpu NAME" in report["out"]  # no GPU named: no step time is made up


def test_cpu_never_calls_qlora_smaller_when_its_table_says_otherwise(tiny_model_dir, capsys):
    report = run(capsys, "--model", str(tiny_model_dir), "--cpu", "--ram", "64GB")
    check_the_verdict_agrees_with_the_tables(report)
    rows = {r["method"]: r for r in report["table"]}
    assert mb(rows["qlora"]) >= mb(rows["lora"]) and float(rows["qlora"]["s"]) > float(rows["lora"]["s"])
    assert report["verdict"].startswith("SFT with lora") and "smallest" not in report["out"]
    assert "qlora saves no memory here and is slower" in report["verdict"]
    assert report["usable"] == pytest.approx(64 * 1024 * 0.9, abs=1)


def test_an_8b_model_on_a_cpu_is_named_impractical_and_checked_against_the_ram(llama_8b_config_only, capsys):
    report = run(capsys, "--model", str(llama_8b_config_only), "--cpu", "--ram", "256GB")
    check_the_verdict_agrees_with_the_tables(report)
    assert re.search(r"^warning: impractical on a CPU: lora would take about [\d,]+ days per 1,000 steps",
                     report["out"], re.M)
    small = run(capsys, "--model", str(llama_8b_config_only), "--cpu", "--ram", "16GB")
    assert small["verdict"].startswith("nothing fits") and small["command"] is None
    assert "run: nothing on this device" in small["out"]


def fake_run(folder, model, peak_mb: float, step_s: float, steps: int = 4) -> None:
    """A finished run as compare leaves it: its config, its summary and its per-step log."""
    folder.mkdir(parents=True)
    (folder / "tuneforge.yaml").write_text(yaml.safe_dump({"model": str(model), "method": "lora", "objective": "sft",
                                                           "batch_size": 2, "max_length": 64}))
    (folder / "summary.json").write_text(json.dumps({"peak_memory_mb": peak_mb, "peak_rss_mb": peak_mb}))
    tokens = 100
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0, "tokens": tokens, "tokens_per_s": tokens / step_s}) + "\n"
        for s in range(1, steps + 1)))


def test_measured_runs_on_this_machine_scale_the_estimates_and_say_so(tiny_model_dir, tmp_path, capsys):
    shape = model_shape(str(tiny_model_dir), ("lora",))
    at_run = estimate_memory_mb(shape, "lora", "sft", batch_size=2, max_length=64)
    fake_run(tmp_path / "runs" / "compare" / "runs" / "lora" / "seed-0", tiny_model_dir, peak_mb=2 * at_run,
             step_s=1.5)
    report = run(capsys, "--model", str(tiny_model_dir), "--cpu", "--ram", "64GB", "--runs", str(tmp_path / "runs"))
    rows = {r["method"]: r for r in report["table"]}
    assert rows["lora"]["basis"] == "measured" and rows["qlora"]["basis"] == "estimate"
    asked = estimate_memory_mb(shape, "lora", "sft", batch_size=8, max_length=512)
    assert mb(rows["lora"]) == round(2 * asked)
    assert "measured on this machine: lora (1 run(s)): peak 2.00x and step time" in report["out"]
    check_the_verdict_agrees_with_the_tables(report)
