"""`tuneforge export`: GGUF files that transformers' GGUF loader reads back to the merged model's logits, and the
layout vLLM serves."""

from __future__ import annotations

import copy

import pytest
import torch

import tuneforge as tf
from conftest import make_tiny_model
from tuneforge.artifacts.export import export, export_gguf

gguf = pytest.importorskip("gguf")


def lora_run(tmp_path, arch, tokenizer):
    """A saved LoRA run (non-zero B) over a tiny model directory of ``arch``; returns (run dir, merged model)."""
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / f"base-{arch}"
    model = make_tiny_model(arch, len(tokenizer))
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(1)
    handle = tf.attach(copy.deepcopy(model), tf.LoRAConfig(r=4, init_lora_weights=False))
    run = handle.save(tmp_path / f"run-{arch}", base_model_name_or_path=str(base_dir))
    merged = handle.merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                           AutoModelForCausalLM.from_pretrained(base_dir).model.layers[0].self_attn.q_proj.weight)
    return run, merged.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype, tol", [("f32", 1e-5), ("f16", 5e-3), ("bf16", 5e-2), ("q8_0", 1e-1)])
def test_gguf_reloads_to_the_merged_logits(tmp_path, tokenizer, arch, dtype, tol):
    from transformers import AutoModelForCausalLM

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    run, merged = lora_run(tmp_path, arch, tokenizer)
    path = export(run, "gguf", output=tmp_path / "out" / "m.gguf", dtype=dtype, verify=False).path
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (got - want).abs().max() <= tol * want.abs().max()
    # The tokenizer reads back through transformers' GGUF converter and encodes as the original does.
    if dtype == "f16":
        from transformers import AutoTokenizer

        back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        text = "Convert the date to ISO format: March 5, 2021 <|im_end|>"
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert back.chat_template == tokenizer.chat_template
    # Tokenizer metadata: every token by id, the special ids and the chat template.
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == tokenizer.chat_template
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tokenizer.eos_token_id


def test_gguf_refuses_what_it_cannot_write(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="gpt2"):
        export_gguf(make_tiny_model("gpt2", len(tokenizer)), tokenizer, tmp_path / "x.gguf")
    lora, _ = lora_run(tmp_path, "llama", tokenizer)
    prompt = tf.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="RANDOM")
    run = tf.attach(make_tiny_model("llama", len(tokenizer)), prompt).save(
        tmp_path / "prompt", base_model_name_or_path=str(lora.parent / "base-llama"))
    with pytest.raises(ValueError, match="cannot be merged"):
        export(run, "gguf")
    with pytest.raises(ValueError, match="dtype"):
        export(run, "gguf", dtype="q4_k")


def test_vllm_layout_keeps_a_lora_adapter_beside_the_base(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import load_adapter

    run, merged = lora_run(tmp_path, "llama", tokenizer)
    result = export(run, "vllm", output=tmp_path / "vllm", verify=False)
    assert result.command.startswith(f"vllm serve {tmp_path / 'vllm' / 'base'} --enable-lora --max-lora-rank 8 ")
    assert f"--lora-modules {run.name}={tmp_path / 'vllm' / 'adapter'}" in result.command
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "vllm" / "base")
    load_adapter(base, tmp_path / "vllm" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)
    prompt = tf.attach(make_tiny_model("llama", len(tokenizer)), tf.PromptTuningConfig(
        num_virtual_tokens=2, prompt_tuning_init="RANDOM")).save(tmp_path / "prompt",
                                                                 base_model_name_or_path=str(run.parent / "base-llama"))
    with pytest.raises(ValueError, match="tuneforge serve"):
        export(prompt, "vllm", output=tmp_path / "vllm-prompt")


def test_cli_export_prints_the_vllm_command(tmp_path, tokenizer, capsys):
    from tuneforge.commands.main import main

    run, _ = lora_run(tmp_path, "llama", tokenizer)
    assert main(["export", str(run), "--format", "vllm", "--output", str(tmp_path / "v")]) == 0
    assert "vllm serve" in capsys.readouterr().out
