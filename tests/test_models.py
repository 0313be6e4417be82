"""``tuneforge.models.loading`` on bad input: every broken model folder, pickle-only weights, a missing path that looks
like a
hub id, a hub id the hub does not have — each a one-line error naming the path (exit 2 from the CLI), never a
traceback or a wait on the network. And what a run records about its base: an absolute path and a fingerprint that
tells another model from the same one, with a warning when an adapter is loaded on a different base."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

import tuneforge
from conftest import make_tiny_model, save_tiny_model_dir
from tuneforge.models import hub
from tuneforge.commands.main import main
from tuneforge.inference.loading import BASE_FINGERPRINT_KEY, check_base_model, load_for_inference
from tuneforge.methods.adapter_files import TUNEFORGE_ADAPTER_META
from tuneforge.models.loading import (InvalidModelError, ModelNotFoundError, load_model, model_fingerprint,
                              resolve_model_reference)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, tokenizer_source):
    import copy

    return save_tiny_model_dir(tmp_path_factory.mktemp("good"), "llama", copy.deepcopy(tokenizer_source))


def broken(good, tmp_path, damage) -> str:
    target = tmp_path / "model"
    shutil.copytree(good, target)
    damage(target)
    return str(target)


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def write_pickle_weights(d):
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


# (case, how the good folder is damaged, the error type, a part of its one-line message)
BROKEN_FOLDERS = [
    ("no weights", lambda d: (d / "model.safetensors").unlink(), InvalidModelError,
     "has config.json but no weights"),
    ("corrupt weights", lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all"),
     InvalidModelError, "model.safetensors: not a valid safetensors file (header length"),
    ("truncated weights", lambda d: truncate(d / "model.safetensors"), InvalidModelError,
     "truncated or padded"),
    ("empty weights", lambda d: (d / "model.safetensors").write_bytes(b""), InvalidModelError,
     "shorter than the 8-byte header length"),
    ("config not JSON", lambda d: (d / "config.json").write_text("{model_type: llama"), InvalidModelError,
     "config.json: invalid JSON (Expecting property name"),
    ("config a list", lambda d: (d / "config.json").write_text("[1, 2]"), InvalidModelError,
     "config.json: expected a JSON object, got list"),
    ("config without model_type", lambda d: (d / "config.json").write_text("{}"), InvalidModelError,
     "no 'model_type'"),
    ("unknown model_type", lambda d: (d / "config.json").write_text('{"model_type": "llamaa"}'), InvalidModelError,
     "model_type 'llamaa' is unknown to transformers"),
    ("no config", lambda d: (d / "config.json").unlink(), ModelNotFoundError, "no config.json"),
    ("pickle-only weights", write_pickle_weights, InvalidModelError,
     "holds only pickle weights (pytorch_model.bin), which tuneforge never unpickles"),
    ("index names a missing shard", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})), InvalidModelError,
     "names shard(s) that are missing: model-00001-of-00002.safetensors"),
]


@pytest.mark.parametrize("damage,error,message", [c[1:] for c in BROKEN_FOLDERS], ids=[c[0] for c in BROKEN_FOLDERS])
def test_a_broken_model_folder_is_a_one_line_error_naming_it(good_dir, tmp_path, capsys, damage, error, message):
    path = broken(good_dir, tmp_path, damage)
    with pytest.raises(error) as e:
        load_model(path, device="cpu")
    assert message in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    assert main(["generate", "--model", path, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneforge: error: ") and message in err and len(err.splitlines()) == 1


def edit_config(**changes):
    def damage(d):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
    return damage


# (case, config.json edits, a part of the one-line message)
BROKEN_CONFIGS = [
    ("negative hidden size", {"hidden_size": -64}, "config.json: hidden_size must be a positive integer, got -64"),
    ("no layers", {"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ("a size as text", {"intermediate_size": "64"}, "intermediate_size must be a positive integer, got '64'"),
    ("heads that do not split the width", {"head_dim": None, "hidden_size": 30},
     "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ("query heads not shared evenly", {"num_key_value_heads": 3},
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("a field transformers refuses", {"hidden_act": "nosuch"},
     "config.json: transformers cannot build the model it describes (KeyError: 'nosuch')"),
]


@pytest.mark.parametrize("changes, message", [c[1:] for c in BROKEN_CONFIGS], ids=[c[0] for c in BROKEN_CONFIGS])
def test_a_broken_model_config_is_one_line_naming_the_file_and_field_in_train_and_recommend(
        good_dir, tmp_path, sft_file, capsys, changes, message):
    path = broken(good_dir, tmp_path, edit_config(**changes))
    for argv in (["train", "--model", path, "--data", str(sft_file), "--output", str(tmp_path / "run")],
                 ["recommend", "--model", path]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"tuneforge: error: {path}") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_a_model_and_a_missing_gguf(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidModelError, match="is a file, not a Hugging Face model directory"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


# -- names that are not local: the hub rule ------------------------------------------------------------------


def forbid_hub(monkeypatch):
    """Fail the test if anything reaches the network stack of huggingface_hub."""
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked although it should not have been")

    monkeypatch.setattr(HfApi, "repo_info", no_network)


def fake_hub(monkeypatch, error: Exception | None = None, files=()):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    asked = []

    def repo_info(self, name, repo_type=None, timeout=None):
        asked.append((name, repo_type, timeout))
        if error is not None:
            raise error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files])

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    return asked


def repository_not_found():
    from huggingface_hub.errors import RepositoryNotFoundError

    return RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants a live HTTP response


@pytest.mark.parametrize("name", ["nosuchdir/mymodel", "./nosuchdir/mymodel", "a/b/c", "no-such-model"])
def test_a_missing_local_path_says_so_without_asking_an_offline_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_hub(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="no such local file or directory") as e:
        load_model(name)
    if hub.looks_like_hub_id(name):
        assert "not tried as a hub model id: HF_HUB_OFFLINE is set" in str(e.value)
    else:
        assert "or a hub id (org/name)" in str(e.value)


@pytest.mark.parametrize("error,message", [
    (None, None),
    ("not found", "the hub has no model 'nosuchorg/mymodel' (or it is private)"),
    (ConnectionError("[Errno -2] Name or service not known"),
     "the hub could not be asked about 'nosuchorg/mymodel': ConnectionError: [Errno -2] Name or service not known"),
])
def test_a_hub_id_is_asked_once_with_a_short_timeout(tmp_path, monkeypatch, error, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from tuneforge.models import loading as models

    models.check_hub_model.cache_clear()
    asked = fake_hub(monkeypatch, repository_not_found() if error == "not found" else error,
                     files=["config.json", "model.safetensors"])
    if message is None:
        assert models.resolve_model_path("nosuchorg/mymodel") == "nosuchorg/mymodel"
        assert models.resolve_model_path("nosuchorg/mymodel") == "nosuchorg/mymodel"  # cached: model + tokenizer
    else:
        with pytest.raises(ModelNotFoundError) as e:
            models.resolve_model_path("nosuchorg/mymodel")
        assert str(e.value) == f"model 'nosuchorg/mymodel': no such local file or directory, and {message}"
    assert asked == [("nosuchorg/mymodel", "model", hub.PROBE_TIMEOUT_S)]


def test_a_hub_model_with_only_pickle_weights_is_refused(monkeypatch):
    from tuneforge.models import loading as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.check_hub_model.cache_clear()
    fake_hub(monkeypatch, files=["config.json", "pytorch_model.bin", "tokenizer.json"])
    with pytest.raises(InvalidModelError, match="has only pickle weights.*tuneforge convert"):
        models.resolve_model_path("someorg/old-model")


# -- what a run records about its base ---------------------------------------------------------------------


def test_resolve_model_reference_makes_local_paths_absolute(tmp_path, monkeypatch, good_dir):
    monkeypatch.chdir(good_dir.parent)
    assert resolve_model_reference(good_dir.name) == str(good_dir)
    assert resolve_model_reference(f"./{good_dir.name}/") == str(good_dir)
    assert os.path.isabs(resolve_model_reference(good_dir.name))
    assert resolve_model_reference("smollm2-135m-instruct") == "smollm2-135m-instruct"  # embedded: a name
    assert resolve_model_reference("someorg/some-model") == "someorg/some-model"  # not local: a hub id


def test_fingerprint_tells_another_model_from_a_copy(good_dir, tmp_path, tokenizer):
    copy_dir = tmp_path / "copy"
    shutil.copytree(good_dir, copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    config["transformers_version"] = "0.0.1"  # who wrote the file is not what the model is
    (copy_dir / "config.json").write_text(json.dumps(config, indent=4))
    other = tmp_path / "other"
    make_tiny_model("llama", len(tokenizer), seed=1).save_pretrained(other)  # same architecture, other weights
    from transformers import AutoModelForCausalLM

    retrained = AutoModelForCausalLM.from_pretrained(good_dir)
    with torch.no_grad():
        retrained.model.norm.weight.add_(1.0)  # one tiny tensor changed (128 bytes of 160 KB)
    retrained.save_pretrained(tmp_path / "retrained")

    fp = model_fingerprint(str(good_dir))
    assert fp.startswith("v1:") and fp == model_fingerprint(str(copy_dir))
    assert model_fingerprint(str(other)) != fp
    assert model_fingerprint(str(tmp_path / "retrained")) != fp
    assert model_fingerprint("someorg/not-local") is None


def adapter_on(base, out, fingerprint: str | None):
    model, _ = load_model(str(base), device="cpu")
    torch.manual_seed(0)
    tuneforge.attach(model, tuneforge.LoRAConfig(r=2, init_lora_weights=False)).save(
        out, base_model_name_or_path=str(base))
    meta = json.loads((out / TUNEFORGE_ADAPTER_META).read_text())
    assert meta[BASE_FINGERPRINT_KEY] == model_fingerprint(str(base))  # save() records the local base's fingerprint
    meta.pop(BASE_FINGERPRINT_KEY)  # as an older adapter, then the fingerprint the test wants
    (out / TUNEFORGE_ADAPTER_META).write_text(json.dumps(
        meta if fingerprint is None else {**meta, BASE_FINGERPRINT_KEY: fingerprint}))
    return out


def test_loading_an_adapter_on_a_different_base_warns(good_dir, tmp_path, tokenizer, caplog):
    adapter = adapter_on(good_dir, tmp_path / "lora", model_fingerprint(str(good_dir)))
    other = tmp_path / "other"
    make_tiny_model("llama", len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with caplog.at_level(logging.WARNING, logger="tuneforge.inference.loading"):
        load_for_inference(str(good_dir), adapter, device="cpu")
        assert not caplog.records
        load_for_inference(str(other), adapter, device="cpu")
    assert len(caplog.records) == 1 and "trained on a different base model" in caplog.text
    # Older adapters and PEFT's files record no fingerprint: nothing to compare, no warning.
    old = adapter_on(good_dir, tmp_path / "old", None)
    assert not check_base_model(old, str(other))


def test_auto_dtype_uses_bf16_for_a_frozen_base_only_on_a_cpu_with_bf16_instructions(monkeypatch, tmp_path,
                                                                                       tiny_model_dir, sft_file):
    from tuneforge.models.loading import cpu_computes_bf16, default_dtype
    from tuneforge.run.trainer import Trainer

    monkeypatch.setenv("TUNEFORGE_CPU_BF16", "1")
    assert cpu_computes_bf16()
    assert default_dtype("cpu", frozen_base=True) == torch.bfloat16
    assert default_dtype("cpu") == torch.float32  # full fine-tuning keeps float32 weights and AdamW state
    lora = Trainer(tuneforge.load_config(None, dict(model=str(tiny_model_dir), data=str(sft_file), device="cpu",
                                                    output=str(tmp_path / "lora"))))
    assert lora.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in lora.handle.trainable_parameters())  # adapters: float32
    full = Trainer(tuneforge.load_config(None, dict(model=str(tiny_model_dir), data=str(sft_file), device="cpu",
                                                    method="full", output=str(tmp_path / "full"))))
    assert full.model.model.embed_tokens.weight.dtype == torch.float32
    monkeypatch.setenv("TUNEFORGE_CPU_BF16", "0")
    assert default_dtype("cpu", frozen_base=True) == torch.float32
