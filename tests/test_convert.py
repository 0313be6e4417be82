"""``tuneforge convert``: pickle weights (one file or shards, tied tensors) become safetensors that load to the same
logits; a pickle that asks for more than tensors is refused without running it; nothing is left half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tiny_model
from tuneforge.commands.main import main
from tuneforge.artifacts.convert import convert_to_safetensors
from tuneforge.models.loading import InvalidModelError, load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def pickle_model_dir(path, arch, tokenizer, shards: int = 1):
    """A model folder as older tools wrote it: config + tokenizer + pytorch_model.bin (or shards with an index)."""
    model = make_tiny_model(arch, len(tokenizer))
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "training_args.bin").write_bytes(b"a pickle that is not part of the model")
    state = model.state_dict()  # tied weights (gpt2: wte and lm_head) share one storage here and in the pickle
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return model
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


@pytest.mark.parametrize("arch,shards", [("llama", 1), ("gpt2", 1), ("qwen2", 2)])
def test_converted_weights_give_the_same_logits(tmp_path, tokenizer, capsys, arch, shards):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    original = pickle_model_dir(src, arch, tokenizer, shards)
    with pytest.raises(InvalidModelError, match="holds only pickle weights"):
        load_model(str(src), device="cpu")
    assert main(["convert", str(src), str(dst)]) == 0
    report = capsys.readouterr().out
    assert "left_out: training_args.bin" in report and "tokenizer_config.json" in report
    files = sorted(p.name for p in dst.iterdir())
    assert not any(f.endswith(".bin") for f in files) and "config.json" in files
    if shards > 1:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"}
    converted, _ = load_model(str(dst), device="cpu", dtype="float32")
    ids = torch.randint(4, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, original(input_ids=ids).logits)


class _Payload:
    """Unpickling this would create the marker file: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, tokenizer):
    src, dst, marker = tmp_path / "src", tmp_path / "dst", tmp_path / "PWNED"
    src.mkdir()
    pickle_model_dir(src, "llama", tokenizer)
    torch.save({"lm_head.weight": torch.zeros(2), "x": _Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(InvalidModelError, match=r"pytorch_model.bin: refused: the pickle asks for more than tensors"
                                                r".*GLOBAL.*not converted") as e:
        convert_to_safetensors(src, dst)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists() and not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dst")] == []  # no temporary folder left


@pytest.mark.parametrize("setup,message", [
    ("exists", "exists and is not empty; pass --overwrite"),
    ("safetensors", "already holds safetensors weights: nothing to convert"),
    ("no weights", "has neither pytorch_model.bin nor pytorch_model.bin.index.json"),
    ("not a state dict", "expected a flat mapping of tensor names to tensors"),
    ("not a pickle", "not a readable torch weights file"),
    ("no config", "not a Hugging Face model directory (no config.json)"),
])
def test_convert_bad_input_exits_2_with_one_line(tmp_path, tokenizer, capsys, setup, message):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    model = pickle_model_dir(src, "llama", tokenizer)
    if setup == "exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif setup == "safetensors":
        (src / "pytorch_model.bin").unlink()
        model.save_pretrained(src)
    elif setup == "no weights":
        (src / "pytorch_model.bin").unlink()
    elif setup == "not a state dict":
        torch.save([torch.zeros(1)], src / "pytorch_model.bin")
    elif setup == "not a pickle":
        (src / "pytorch_model.bin").write_bytes(b"\x00garbage")
    elif setup == "no config":
        (src / "config.json").unlink()
    capsys.readouterr()  # the setup's own output
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert setup == "exists" or not dst.exists()
