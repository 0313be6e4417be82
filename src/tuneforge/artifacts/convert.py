"""Rewrite a model folder whose weights are pickles (``pytorch_model.bin``) as safetensors, once.

tuneforge never loads pickle weights: unpickling can run code. This is the one place a pickle is read, with
torch's restricted unpickler (``torch.load(weights_only=True)``), which rebuilds tensors and plain containers only
and refuses a pickle that asks for anything else (a malicious payload): such a file is reported, not converted.
The tensors keep their names, one safetensors file per pickle shard; config.json, the tokenizer and every other
non-pickle file are copied as they are. The output appears all at once (written beside it, then renamed).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from ..outputs import check_output, staged_dir
from ..models.loading import (PICKLE_SUFFIXES, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, InvalidModelError,
                     ModelNotFoundError, check_model_dir, read_model_config)

PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"


def convert_to_safetensors(source: str | Path, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write ``output``: ``source``'s pickle weights as safetensors plus its other files. Returns a report.

    ``output`` is never ``source`` (nor inside or around it); a non-empty one is replaced only with ``overwrite``."""
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not (source / "config.json").is_file():
        raise ModelNotFoundError(f"{source}: not a Hugging Face model directory (no config.json)")
    read_model_config(source)
    check_output(output, inputs=[source], overwrite=overwrite, flag="DST")
    shards, index = pickle_shards(source)
    with staged_dir(output) as tmp:
        renamed = {shard: safetensors_name(shard, sharded=index is not None) for shard in shards}
        tensors = 0
        for shard, name in renamed.items():
            state = load_restricted(source / shard)
            _save(state, tmp / name)
            tensors += len(state)
            del state  # one shard in memory at a time
        if index is not None:
            index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
            (tmp / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copied, left_out = _copy_other_files(source, tmp, set(shards) | {PICKLE_INDEX_NAME})
        check_model_dir(tmp)  # what tuneforge will check when it loads the result
    return {"output": str(output), "weight_files": ", ".join(renamed.values()), "tensors": tensors,
            "copied": ", ".join(copied) or "none", "left_out": ", ".join(left_out) or "none"}


def pickle_shards(source: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The pickle weight files of ``source`` (one, or the shards of its index) and the parsed index, if any."""
    index_path = source / PICKLE_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InvalidModelError(f"{index_path}: invalid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidModelError(f"{index_path}: expected a JSON object with a 'weight_map' of name -> file")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (source / s).is_file()]
        if missing:
            raise InvalidModelError(f"{index_path} names shard(s) that are missing: {', '.join(missing[:3])}")
        return shards, index
    if (source / PICKLE_NAME).is_file():
        return [PICKLE_NAME], None
    if (source / SAFETENSORS_NAME).is_file() or (source / SAFETENSORS_INDEX_NAME).is_file():
        raise InvalidModelError(f"{source} already holds safetensors weights: nothing to convert")
    raise InvalidModelError(f"{source} has neither {PICKLE_NAME} nor {PICKLE_INDEX_NAME} to convert")


def safetensors_name(pickle_name: str, sharded: bool) -> str:
    """``pytorch_model.bin`` -> ``model.safetensors``; ``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors`` (the names transformers looks for)."""
    if not sharded:
        return SAFETENSORS_NAME
    stem = Path(pickle_name).stem
    return ("model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem) + ".safetensors"


def load_restricted(file: Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` mapping from a pickle, through torch's restricted unpickler only."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; keep only the line that says what the pickle asked for.
        lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not lines:  # not a pickle torch can read at all (garbage, another format)
            reason = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
            raise InvalidModelError(f"{file}: not a readable torch weights file ({reason})") from None
        raise InvalidModelError(f"{file}: refused: the pickle asks for more than tensors, so it may run code "
                                f"({lines[0]}); not converted") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"{file}: not a readable torch weights file ({reason})") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise InvalidModelError(f"{file}: expected a flat mapping of tensor names to tensors (a state dict)")
    return state


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors stores each tensor in its own bytes: tensors that share memory in the pickle (tied embeddings,
    # views) are copied apart; transformers ties them again when it loads the model.
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            storage.nbytes() == tensor.numel() * tensor.element_size()
        if storage.data_ptr() in seen or not whole:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(storage.data_ptr())
        out[name] = tensor
    save_file(out, str(path), metadata={"format": "pt"})


def _copy_other_files(source: Path, target: Path, weights: set[str]) -> tuple[list[str], list[str]]:
    """Copy every top-level file that is not a pickle; return (copied, left out)."""
    copied, left_out = [], []
    for path in sorted(source.iterdir()):
        if path.name in weights:
            continue
        if path.is_file() and path.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
        else:  # another pickle (training_args.bin, optimizer.pt) or a folder: not part of the model
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return copied, left_out


__all__ = ["convert_to_safetensors", "load_restricted", "pickle_shards", "safetensors_name"]
