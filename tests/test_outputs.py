"""Nothing overwritten (issue 21, cases 1-5 and 9): every command that writes refuses to write onto its own input
and to replace a non-empty target without --overwrite, writes through a staging path, and leaves no temp file; a
resumed run keeps the "before" numbers of the run it continues."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
import tuneforge as tf
from conftest import make_tiny_model, save_tiny_model_dir, write_jsonl
from tuneforge.run import checkpoint as ckpt
from tuneforge.commands.main import main
from tuneforge.outputs import OutputConflict, check_output, staged_dir, staged_file

pytestmark = pytest.mark.usefixtures("single_thread")


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and the one error line (``tuneforge: error: ...``)."""
    code = main([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tuneforge: error:")]
    assert len(errors) == (code == 2), errors
    return code, errors[0] if errors else ""


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must be unchanged after a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


@pytest.fixture
def lora_run(tmp_path, tokenizer):
    """A LoRA run (non-zero B) over a tiny Llama model folder: (run dir, base dir)."""
    base = save_tiny_model_dir(tmp_path / "base", "llama", tokenizer)
    torch.manual_seed(1)
    handle = tf.attach(make_tiny_model("llama", len(tokenizer)), tf.LoRAConfig(r=4, init_lora_weights=False))
    return handle.save(tmp_path / "run", base_model_name_or_path=str(base)), base


# -- the rule itself ------------------------------------------------------------------------------------------


def test_check_output_refuses_inputs_their_insides_and_their_parents(tmp_path):
    model = tmp_path / "models" / "victim"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for target in (model, model / "sub", model / "config.json", tmp_path / "models", tmp_path):
        with pytest.raises(OutputConflict, match="input"):
            check_output(target, inputs=[model], overwrite=True)
    check_output(tmp_path / "elsewhere", inputs=[model, "a-hub/id-that-is-not-a-folder"])


def test_check_output_needs_overwrite_for_a_non_empty_target(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.gguf").write_text("mine")
    with pytest.raises(OutputConflict, match="--overwrite"):
        check_output(tmp_path / "full")
    with pytest.raises(OutputConflict, match="--overwrite"):
        check_output(tmp_path / "file.gguf", kind="file")
    check_output(tmp_path / "full", overwrite=True)
    check_output(tmp_path / "empty")
    with pytest.raises(OutputConflict, match="is a directory"):
        check_output(tmp_path / "full", kind="file", overwrite=True)
    with pytest.raises(OutputConflict, match="is a file"):
        check_output(tmp_path / "file.gguf", kind="dir", overwrite=True)


def test_staged_writes_leave_the_old_target_whole_on_failure_and_no_temp_files(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as staging:
            (staging / "new.bin").write_text("half")
            raise RuntimeError("killed")
    assert snapshot(target) == {"old.bin": b"old"} and leftovers(tmp_path) == []
    with staged_dir(target) as staging:
        (staging / "new.bin").write_text("new")
    assert snapshot(target) == {"new.bin": b"new"} and leftovers(tmp_path) == []  # replaced whole, not mixed
    with pytest.raises(RuntimeError):
        with staged_file(tmp_path / "m.gguf") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not (tmp_path / "m.gguf").exists() and leftovers(tmp_path) == []


# -- 1, 5: export gguf --------------------------------------------------------------------------------------------


def test_gguf_export_onto_the_runs_own_adapter_is_refused(lora_run, capsys):
    run, _ = lora_run
    before = snapshot(run)
    code, error = cli(capsys, "export", run, "--format", "gguf", "--output", run / "adapter_model.safetensors",
                      "--overwrite")
    assert code == 2 and "input" in error
    assert snapshot(run) == before


def test_gguf_export_into_an_existing_folder_fails_before_writing_and_leaves_no_temp(lora_run, tmp_path, capsys):
    run, _ = lora_run
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "keep.txt").write_text("mine")
    code, error = cli(capsys, "export", run, "--format", "gguf", "--output", tmp_path / "exports")
    assert code == 2 and "is a directory" in error
    assert snapshot(tmp_path / "exports") == {"keep.txt": b"mine"} and leftovers(tmp_path) == []


def test_gguf_export_replaces_an_existing_file_only_with_overwrite(lora_run, tmp_path, capsys):
    pytest.importorskip("gguf")
    run, _ = lora_run
    target = tmp_path / "m.gguf"
    target.write_text("an older export")
    code, error = cli(capsys, "export", run, "--format", "gguf", "--dtype", "f32", "--output", target)
    assert code == 2 and "--overwrite" in error and target.read_text() == "an older export"
    # --no-verify: this test is about the file, not the numbers (a random tiny model's near-ties make greedy
    # agreement a coin toss; tests/test_verify.py checks verification on trained ones).
    assert cli(capsys, "export", run, "--format", "gguf", "--dtype", "f32", "--output", target, "--overwrite",
               "--no-verify")[0] == 0
    assert target.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path) == []


# -- 4: export vllm -----------------------------------------------------------------------------------------------


def test_vllm_export_into_a_non_empty_folder_is_refused_then_replaced_whole(lora_run, tmp_path, capsys):
    run, _ = lora_run
    out = tmp_path / "vllm"
    out.mkdir()
    (out / "model.safetensors").write_text("a stale model")
    code, error = cli(capsys, "export", run, "--format", "vllm", "--output", out)
    assert code == 2 and "--overwrite" in error and snapshot(out) == {"model.safetensors": b"a stale model"}
    assert cli(capsys, "export", run, "--format", "vllm", "--output", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "verify.json"]  # nothing stale mixed in
    assert leftovers(tmp_path) == []


# -- 3: merge -----------------------------------------------------------------------------------------------------


def test_merge_onto_an_existing_model_folder_needs_overwrite_and_never_the_base(lora_run, tmp_path, tokenizer,
                                                                               capsys):
    run, base = lora_run
    other = save_tiny_model_dir(tmp_path / "other", "llama", tokenizer)
    before = snapshot(other)
    code, error = cli(capsys, "merge", run, "--output", other)
    assert code == 2 and "--overwrite" in error and snapshot(other) == before
    base_before = snapshot(base)
    for target in (base, run, run / "merged"):
        code, error = cli(capsys, "merge", run, "--output", target, "--overwrite")
        assert code == 2 and "input" in error, target
    assert snapshot(base) == base_before
    assert cli(capsys, "merge", run, "--output", other, "--overwrite")[0] == 0
    assert "model.safetensors" in snapshot(other) and leftovers(tmp_path) == []


# -- 2: train -----------------------------------------------------------------------------------------------------


def test_full_fine_tuning_into_its_own_base_model_folder_is_refused(tmp_path, tokenizer, sft_file, capsys):
    victim = save_tiny_model_dir(tmp_path / "models" / "victim", "llama", tokenizer)
    before = snapshot(victim)
    for output in (victim, victim / "run", tmp_path / "models"):
        code, error = cli(capsys, "train", "--method", "full", "--model", victim, "--data", sft_file, "--output",
                          output, "--max-steps", 1, "--overwrite", "--progress", "false")
        assert code == 2 and "input" in error, output
    assert snapshot(victim) == before  # not even a lock file
    code, error = cli(capsys, "train", "--model", victim, "--data", sft_file, "--output", sft_file.parent / "x" /
                      ".." / sft_file.name, "--max-steps", 1)
    assert code == 2 and "input" in error  # nor the data


def test_train_into_a_folder_that_holds_something_else_needs_overwrite_and_then_owns_it(tmp_path, tokenizer,
                                                                                        sft_file, capsys):
    model = save_tiny_model_dir(tmp_path / "base", "llama", tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("somebody's model")
    args = ["train", "--model", model, "--data", sft_file, "--output", out, "--max-steps", 1, "--batch-size", 2,
            "--progress", "false", "--eval-generate", "false", "--general-eval", "null"]
    code, error = cli(capsys, *args)
    assert code == 2 and "--overwrite" in error
    assert snapshot(out) == {"model.safetensors": b"somebody's model"}
    assert cli(capsys, *args, "--overwrite")[0] == 0
    assert not (out / "model.safetensors").exists()  # the run's adapter is not mixed with a stale whole model
    assert (out / "adapter_model.safetensors").is_file()


# -- 9: a resumed run keeps its "before" numbers ------------------------------------------------------------------


def test_a_resumed_run_reports_the_before_numbers_of_the_run_it_continues(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
            for i in range(12)]
    data, held_out = write_jsonl(tmp_path / "d.jsonl", rows[:8]), write_jsonl(tmp_path / "e.jsonl", rows[8:])

    def config(**overrides):
        values = dict(data=str(data), eval_data=str(held_out), output=str(tmp_path / "run"), max_steps=3,
                      batch_size=2, max_length=32, progress=False, seed=0, save_every=1, eval_max_new_tokens=2,
                      learning_rate=1e-2, method_options={"r": 2})
        return tuneforge.load_config(None, {**values, **overrides})

    original = tuneforge.run.trainer.Trainer.optimizer_step

    def killed(self, batches, i):
        if i == 2:
            raise KeyboardInterrupt
        return original(self, batches, i)

    tuneforge.run.trainer.Trainer.optimizer_step = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            tuneforge.train(config(), make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))
    finally:
        tuneforge.run.trainer.Trainer.optimizer_step = original
    kept = ckpt.read_run_record(tmp_path / "run")["baseline"]
    assert {"eval_before_loss", "exact_match_before", "general_ppl_before"} <= kept.keys()
    result = tuneforge.train(config(resume=True), make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("eval_before_loss", "exact_match_before", "general_ppl_before"):
        assert summary[key] == kept[key] == result.metrics[key], key
    assert "forgetting" in summary and "exact_match_after" in summary


# -- convert, report, generate ------------------------------------------------------------------------------------


def test_convert_never_writes_onto_its_source_and_replaces_only_with_overwrite(tmp_path, tokenizer, capsys):
    src = tmp_path / "pickled"
    src.mkdir()
    model = make_tiny_model("llama", len(tokenizer))
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    before = snapshot(src)
    code, error = cli(capsys, "convert", src, src, "--overwrite")
    assert code == 2 and "input" in error and snapshot(src) == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("stale")
    code, error = cli(capsys, "convert", src, out)
    assert code == 2 and "--overwrite" in error
    assert cli(capsys, "convert", src, out, "--overwrite")[0] == 0
    assert "stale.safetensors" not in snapshot(out) and "model.safetensors" in snapshot(out)
    assert leftovers(tmp_path) == []


def test_report_never_writes_onto_a_run_and_replaces_only_its_own_earlier_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    before = snapshot(run)
    code, error = cli(capsys, "report", run, "--output", run)
    assert code == 2 and "input" in error and snapshot(run) == before
    code, error = cli(capsys, "report", run, "--output", tmp_path)
    assert code == 2 and "input" in error
    assert cli(capsys, "report", run)[0] == 0 and (run / "report" / "index.html").is_file()
    assert cli(capsys, "report", run)[0] == 0  # its own earlier report is replaced
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    code, error = cli(capsys, "report", run, "--output", mine)
    assert code == 2 and "--overwrite" in error and (mine / "todo.txt").read_text() == "mine"


def test_generate_never_writes_its_predictions_over_its_input(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    before = data.read_bytes()
    code, error = cli(capsys, "generate", "--model", tiny_model_dir, "--data", data, "--output", data, "--overwrite",
                      "--max-new-tokens", 1)
    assert code == 2 and "input" in error and data.read_bytes() == before
    out = write_jsonl(tmp_path / "old.jsonl", [{"x": 1}])
    code, error = cli(capsys, "generate", "--model", tiny_model_dir, "--data", data, "--output", out,
                      "--max-new-tokens", 1)
    assert code == 2 and "--overwrite" in error


def test_no_output_command_leaves_files_in_the_working_directory(tmp_path, lora_run, capsys, monkeypatch):
    """A refused command is refused before it creates anything (not even the default output's parent)."""
    run, _ = lora_run
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    cli(capsys, "export", run, "--format", "gguf", "--output", run)
    assert sorted(os.listdir(tmp_path)) == before
    assert load_file(str(run / "adapter_model.safetensors"))


def test_resume_into_a_folder_that_holds_no_run_does_not_empty_it(tmp_path, tokenizer, sft_file, capsys):
    model = save_tiny_model_dir(tmp_path / "base", "llama", tokenizer)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, error = cli(capsys, "train", "--model", model, "--data", sft_file, "--output", out, "--max-steps", 1,
                      "--resume")
    assert code == 2 and "--overwrite" in error and snapshot(out) == {"notes.txt": b"mine"}
