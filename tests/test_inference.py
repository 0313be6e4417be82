"""``tuneforge.inference.loading``: base + adapter loaded the way the adapter's method asks (a QLoRA adapter's base in
4 bits),
the same logits as the model that was saved, the base-model resolution order, and the loader's clients (merge,
prompt evaluation). Tiny models built from configs; nothing downloads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import tuneforge
from conftest import save_tiny_model_dir
from tuneforge.inference import loading as inference
from tuneforge.commands.main import main
from tuneforge.inference.loading import default_model, load_for_inference
from tuneforge.artifacts.merge import merge_adapter
from tuneforge.methods.qlora import QLoRAConfig, is_4bit_model, quantization_summary
from tuneforge.models.loading import DEFAULT_MODEL

pytestmark = pytest.mark.usefixtures("single_thread")


def ids_for(tokenizer) -> torch.Tensor:
    return torch.randint(4, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))


def spy_load_model(monkeypatch) -> list[dict]:
    """Record the keyword arguments ``load_for_inference`` passes to ``load_model``."""
    calls: list[dict] = []
    real = inference.load_model

    def spy(name, **kwargs):
        calls.append({"name": name, **kwargs})
        return real(name, **kwargs)

    monkeypatch.setattr(inference, "load_model", spy)
    return calls


def save_qlora_adapter(base_dir, out_dir, **options):
    """A QLoRA adapter with non-zero B on ``base_dir``, saved; returns the in-process model it came from."""
    model, _ = tuneforge.load_model(str(base_dir), device="cpu")
    torch.manual_seed(0)
    handle = tuneforge.attach(model, QLoRAConfig(r=4, init_lora_weights=False, **options))
    handle.save(out_dir, base_model_name_or_path=str(base_dir))
    return model.eval(), handle


@pytest.mark.parametrize("blocksize", [64, 128], ids=["transformers-4bit-loader", "quantised-in-attach"])
def test_qlora_adapter_loads_its_base_in_4bit_with_the_saved_logits(tmp_path, tiny_model_dir, tokenizer, monkeypatch,
                                                                     blocksize):
    trained, trained_handle = save_qlora_adapter(tiny_model_dir, tmp_path / "qlora", bnb_4bit_blocksize=blocksize)
    calls = spy_load_model(monkeypatch)

    model, tok, handle = load_for_inference(str(tiny_model_dir), str(tmp_path / "qlora"), device="cpu")

    (call,) = calls
    if blocksize == 64:  # QLoRA.model_load_kwargs: transformers loads the checkpoint straight into 4 bits
        config = call["quantization_config"]
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        assert getattr(model, "hf_quantizer", None) is not None
    else:  # transformers only does block size 64: the base loads in float and QLoRA's attach quantises it
        assert "quantization_config" not in call
    assert is_4bit_model(model) and isinstance(handle.config, QLoRAConfig)
    assert quantization_summary(model) == quantization_summary(trained)
    assert quantization_summary(model)["blocksize"] == blocksize
    assert not model.training
    ids = ids_for(tok)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = model(input_ids=ids).logits
        assert torch.equal(got, expected)
        with handle.disabled():  # the adapter took part
            assert (model(input_ids=ids).logits - got).abs().max() > 1e-4


def test_lora_adapter_loads_a_float_base_with_no_extra_kwargs(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    model, _ = tuneforge.load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    tuneforge.attach(model, tuneforge.LoRAConfig(r=4, init_lora_weights=False)).save(tmp_path / "lora")
    calls = spy_load_model(monkeypatch)
    loaded, tok, handle = load_for_inference(str(tiny_model_dir), tmp_path / "lora", device="cpu", dtype="float32")
    assert calls == [{"name": str(tiny_model_dir), "device": "cpu", "dtype": "float32"}]
    assert not is_4bit_model(loaded) and handle is not None
    ids = ids_for(tok)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_no_adapter_and_a_whole_model_directory(tmp_path, tokenizer):
    base = save_tiny_model_dir(tmp_path / "full-run", "llama", tokenizer)  # what full fine-tuning saves
    plain, tok, handle = load_for_inference(str(base), None, device="cpu")
    assert handle is None and tok.chat_template  # a chat template is always ensured
    as_adapter, _, handle = load_for_inference("some-other-base", str(base), device="cpu")
    assert handle is None  # the directory is the model; nothing is attached
    ids = ids_for(tok)
    with torch.no_grad():
        assert torch.equal(as_adapter(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_default_model_resolution_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert default_model(None, None) == DEFAULT_MODEL
    assert default_model(str(run), None) == DEFAULT_MODEL  # nothing recorded: the embedded default
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None, "peft_type": "LORA"}))
    assert default_model(str(run), None) == DEFAULT_MODEL
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base-from-adapter"}))
    assert default_model(str(run), None) == "base-from-adapter"
    (run / "tuneforge.yaml").write_text(yaml.safe_dump({"method": "lora"}))  # a config without a model
    assert default_model(run, None) == "base-from-adapter"
    (run / "tuneforge.yaml").write_text(yaml.safe_dump({"model": "base-from-run-config", "method": "lora"}))
    assert default_model(str(run), None) == "base-from-run-config"
    assert default_model(str(run), "explicit") == "explicit"  # --model wins over everything
    assert default_model(None, "explicit") == "explicit"


# -- clients of the loader ----------------------------------------------------------------------------------------


def test_merge_dequantises_a_qlora_adapter(tmp_path, tiny_model_dir, tokenizer):
    trained, _ = save_qlora_adapter(tiny_model_dir, tmp_path / "qlora")
    report = merge_adapter(tmp_path / "qlora", tmp_path / "merged", device="cpu")  # base read from the adapter
    assert float(report["max_abs_logit_diff"]) < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not is_4bit_model(merged) and not hasattr(merged.config, "quantization_config")
    ids = ids_for(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-3, rtol=0)


def test_merging_a_method_that_cannot_merge_is_a_clear_cli_error(tmp_path, tiny_model_dir, capsys):
    model, _ = tuneforge.load_model(str(tiny_model_dir), device="cpu")
    handle = tuneforge.attach(model, tuneforge.PromptTuningConfig(num_virtual_tokens=4))
    handle.save(tmp_path / "prompt", base_model_name_or_path=str(tiny_model_dir))
    rc = main(["merge", str(tmp_path / "prompt"), "--output", str(tmp_path / "merged"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "tuneforge: error: a 'prompt_tuning' adapter cannot be merged" in err
    assert not (tmp_path / "merged").exists()


def test_prompt_commands_load_through_the_inference_loader(tmp_path, tiny_model_dir, monkeypatch):
    from tuneforge.commands import prompting as prompting_cli

    save_qlora_adapter(tiny_model_dir, tmp_path / "qlora")
    calls = spy_load_model(monkeypatch)
    model, tokenizer = prompting_cli.load_model_for_cli(None, str(tmp_path / "qlora"), "cpu")
    (call,) = calls
    assert call["name"] == str(tiny_model_dir)  # no --model: the adapter's base
    assert "quantization_config" in call and is_4bit_model(model)
