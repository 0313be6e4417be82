"""End to end on the embedded SmolLM2-135M-Instruct: LoRA SFT for a few steps on the bundled demo data lowers the
loss, and the adapter tuneforge saves loads in PEFT on the same base with the same logits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import tuneforge
from conftest import write_jsonl
from tuneforge.data.formats import load_examples
from tuneforge.models.loading import ModelNotFoundError, load_tokenizer, resolve_model_path

DEMO = Path(tuneforge.__file__).parent / "assets" / "demo" / "train.jsonl"
FALLBACK_ROWS = [{"instruction": "Write this date as YYYY-MM-DD.", "input": f"{d} March {y}",
                  "output": f"{y}-03-{d:02d}"} for d, y in zip(range(1, 17), range(1990, 2006))]


def demo_rows(n: int) -> list[dict]:
    if DEMO.is_file():
        rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()][:n]
        if len(rows) == n:
            return rows
    return FALLBACK_ROWS[:n]


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")  # on a busy 2-core machine one thread is ~5x faster than two
def test_lora_sft_on_smollm2_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    try:
        path = resolve_model_path("smollm2-135m-instruct")
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows(16))
    examples = load_examples(data)
    before = tuneforge.perplexity(model, tokenizer, examples, max_length=96)["loss"]

    config = tuneforge.load_config(None, dict(
        model="smollm2-135m-instruct", data=str(data), output=str(tmp_path / "run"), method="lora",
        method_options={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        max_steps=5, batch_size=4, learning_rate=2e-3, warmup_steps=0, max_length=96, progress=False,
        eval_generate=False))
    result = tuneforge.train(config, model, tokenizer)
    after = tuneforge.perplexity(result.model, tokenizer, examples, max_length=96)["loss"]
    assert after < before - 0.1, (before, after)

    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    # PEFT opens the base by this path itself (the embedded model's local folder); our metadata keeps the name.
    assert Path(saved["base_model_name_or_path"]) == Path(path) and saved["peft_type"] == "LORA"
    meta = json.loads((tmp_path / "run" / "tuneforge_adapter.json").read_text())
    assert meta["base_model"] == "smollm2-135m-instruct"
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run"), dtype=torch.float32).eval()
    probe = tokenizer(["The date is 2021-03-05.", "Write this date as YYYY-MM-DD: 5 March 2021"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = result.model.eval()(**probe).logits
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()
        theirs = loaded(**probe).logits
        torch.testing.assert_close(auto(**probe).logits, theirs, atol=1e-5, rtol=1e-5)  # by name, outside tuneforge
        with loaded.disable_adapter():
            untouched = loaded(**probe).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - untouched).abs().max() > 1e-2  # the adapter PEFT loaded is the trained one
    print(f"smollm2 e2e: loss {before:.3f} -> {after:.3f}, max |logit diff| vs PEFT "
          f"{(theirs - ours).abs().max().item():.2e}, {time.perf_counter() - start:.1f} s")
