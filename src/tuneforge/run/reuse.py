"""Whether earlier work may stand in for a run (DESIGN.md, "Outputs and reuse"): a pipeline stage or a compare row
is reused only when it was made with the same settings and the same data; otherwise it is refused or redone,
naming what changed.

A run's signature has two parts:

* ``settings``: the config minus what ``--resume`` may change (the trainer's ``RESUMABLE_CHANGES``: where and how
  often things are written, shown and evaluated), with the model as the trainer records it (a local folder by
  absolute path). A caller may keep some of those keys (a compare row is also what the run measured).
* ``data``: for every data file those settings name, its size and sha256, so an edited file is seen even under
  the same name. A name that is not a local file (a hub data set) stands for itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import TuneforgeError

if TYPE_CHECKING:  # the config imports torch; a signature is only taken of a config already built
    from ..config import RunConfig

NOT_LOCAL = "not a local file"  # a hub data set: known by its name only


class SettingsChanged(TuneforgeError, ValueError):
    """Earlier work was made with other settings or data; reusing it would report the wrong run."""


def signature(config: RunConfig, keep: Iterable[str] = ()) -> dict[str, Any]:
    """``{"settings": ..., "data": ...}`` for ``config``, JSON-shaped (it is compared with a recorded one)."""
    from ..models.loading import resolve_model_reference
    from .trainer import RESUMABLE_CHANGES

    settings = config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES) - set(keep))
    settings["model"] = resolve_model_reference(config.model)
    return json.loads(json.dumps({"settings": settings, "data": data_fingerprint(config, settings)}))


def data_files(config: RunConfig, settings: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name as given, file read)`` for each data file the signature's settings name."""
    from ..inference.benchmarks import local_task_paths
    from ..data.mixing import general_eval_file, general_eval_tasks, parse_sources

    files = [(source.path, source.file) for source in parse_sources(config.data)] if "data" in settings else []
    if settings.get("eval_data"):
        files.append((config.eval_data, config.eval_data))
    general = general_eval_file(config.general_eval) if "general_eval" in settings else None
    if general:
        files.append((config.general_eval, general))
    if "general_eval" in settings:  # local lm-eval task YAMLs (tasks:PATH): an edited task is another measurement
        files += [(path, path) for path in local_task_paths(general_eval_tasks(config.general_eval))]
    return files


def data_fingerprint(config: RunConfig, settings: dict[str, Any]) -> dict[str, str]:
    return {name: file_fingerprint(Path(file)) for name, file in data_files(config, settings)}


def file_fingerprint(path: Path) -> str:
    """``size sha256`` of a file; of every file under a folder (by relative path); NOT_LOCAL for anything else."""
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size} {_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}"
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)} {file_fingerprint(file)}\n".encode())
        return f"folder {digest.hexdigest()}"
    return NOT_LOCAL


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by size and modification time: compare hashes the same data file once, not once per method."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changes(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between a recorded signature and the current one, each as a short phrase:
    ``max_steps 5 -> 8``, ``data changed (train.jsonl)``. Empty: the same run."""
    if not recorded:
        return ["no settings were recorded for it"]
    old, new = recorded.get("settings", {}), current["settings"]
    found = [f"{key} {_short(old.get(key))} -> {_short(new.get(key))}" for key in sorted(set(old) | set(new))
             if old.get(key) != new.get(key)]
    # A file both runs read whose content differs; a file only one reads shows as a settings change above.
    edited = [name for name, print_ in current["data"].items()
              if name in recorded.get("data", {}) and recorded["data"][name] != print_]
    if edited:
        found.append(f"data changed ({', '.join(edited)})")
    return found


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["NOT_LOCAL", "SettingsChanged", "changes", "data_files", "data_fingerprint", "file_fingerprint",
           "signature"]
