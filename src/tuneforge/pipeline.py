"""Multi-stage runs as one config: ``tuneforge train pipeline.yaml`` where the YAML has ``stages:``.

    model: smollm2-135m-instruct     # keys outside `stages` apply to every stage (any `tuneforge train` key)
    method: lora
    output: runs/domain
    stages:
      - name: pretrain
        objective: pretrain
        data: [domain.jsonl:0.8, general:0.2]
      - name: sft
        objective: sft
        data: task.jsonl

Stage N trains into ``OUTPUT/NAME``. Its result feeds stage N+1 as the base model: a fully fine-tuned stage is a
model directory already; an adapter stage is merged into its base first (``OUTPUT/NAME/merged``). A stage with
``feed: false`` (a reward model) leaves the chain alone; later stages name its directory as ``{stages.NAME}``
(``ppo_reward_model: "{stages.reward}"``).

``OUTPUT/pipeline.json`` records the stages finished and the model each one handed on, written after every
stage: run the same command again after a kill and finished stages are skipped; the stage that was running
resumes from its last checkpoint (``save_every``) or, without one, starts again.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from .checkpoint import write_text_atomic
from .config import ConfigError, RunConfig, load_config

log = logging.getLogger(__name__)

STATE_NAME = "pipeline.json"
STAGE_ONLY_KEYS = ("name", "feed")


def is_pipeline(path: str | Path) -> bool:
    """A YAML config with ``stages:`` (read as text first: a plain run config stays a plain run)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "stages" in data


def read_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The shared keys (flags win) and the stages; checks names and shapes before anything trains."""
    data = yaml.safe_load(Path(path).read_text())
    stages = data.pop("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"{path}: stages must be a non-empty list of mappings (each a stage's config keys)")
    shared = {**data, **(overrides or {})}
    names = [str(s.get("name") or s.get("objective") or f"stage{i + 1}") for i, s in enumerate(stages)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must differ; got {', '.join(names)} (give each a name:)")
    out = []
    for name, stage in zip(names, stages):
        stage = {**stage, "name": name}
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{path}: stage name {name!r} must be a plain directory name")
        out.append(stage)
    return shared, out


def stage_config(shared: dict[str, Any], stage: dict[str, Any], output: Path, model: str | None,
                 outputs: dict[str, str], source: str) -> RunConfig:
    values = {**shared, **{k: v for k, v in stage.items() if k not in STAGE_ONLY_KEYS}}
    values = _substitute(values, outputs, f"{source}: stage {stage['name']}")
    values["output"] = str(output / stage["name"])
    if model is not None and "model" not in stage:
        values["model"] = model
    try:
        return load_config(None, values)
    except ConfigError as e:
        raise ConfigError(f"{source}: stage {stage['name']}: {e}") from None


def _substitute(value: Any, outputs: dict[str, str], where: str) -> Any:
    """``{stages.NAME}`` -> that earlier stage's output directory."""
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, where) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(1) not in outputs:
            raise ConfigError(f"{where}: {match.group(0)} names no earlier stage (earlier: {', '.join(outputs)})")
        return outputs[match.group(1)]

    return re.sub(r"\{stages\.([A-Za-z0-9_.-]+)\}", replace, value)


def run_pipeline(path: str | Path, overrides: dict[str, Any] | None = None,
                 train_fn: Callable[[RunConfig], Any] | None = None,
                 merge_fn: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """Run the stages in order, skipping finished ones; the final state (stage -> output, and the model chain)."""
    from .checkpoint import latest_checkpoint, read_run_record
    from .merge import merge_adapter
    from .trainer import train

    train_fn, merge_fn = train_fn or train, merge_fn or (lambda a, o: merge_adapter(a, o))
    shared, stages = read_pipeline(path, overrides)
    output = Path(shared.pop("output", "runs/pipeline"))
    for key in ("resume", "overwrite"):  # per stage, the pipeline decides
        shared.pop(key, None)
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_NAME
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"done": {}, "model": None}
    # Every stage's config is built once up front: a typo in the last stage fails before the first trains.
    planned = {s["name"]: str(output / s["name"]) for s in stages}
    earlier = [dict(list(planned.items())[:i]) for i in range(len(stages))]  # {stages.X}: an earlier stage only
    for i, stage in enumerate(stages):
        stage_config(shared, stage, output, state["model"] or shared.get("model"), earlier[i], str(path))
    for i, stage in enumerate(stages):
        name = stage["name"]
        if name in state["done"]:
            log.info("pipeline: stage %s already done (%s)", name, state["done"][name])
            continue
        config = stage_config(shared, stage, output, state["model"], earlier[i], str(path))
        run_dir = Path(config.output)
        record = read_run_record(run_dir) if run_dir.is_dir() else None
        if not (record and record.get("finished")):
            again = {"resume": True} if latest_checkpoint(run_dir) is not None else {"overwrite": True}
            log.info("pipeline: stage %s (%s %s) -> %s%s", name, config.objective, config.method, run_dir,
                     " (resuming)" if "resume" in again else "")
            train_fn(config.model_copy(update=again))
        handed_on = state["model"]
        if stage.get("feed", True):
            handed_on = str(run_dir) if config.method_class.trains_base_weights else _merged(run_dir, merge_fn)
        state["done"][name] = str(run_dir)
        state["model"] = handed_on
        write_text_atomic(state_path, json.dumps(state, indent=1))
    return state


def _merged(run_dir: Path, merge_fn: Callable[[str, str], Any]) -> str:
    """The stage's adapter folded into its base, the next stage's model."""
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        tmp = run_dir.parent / f".{run_dir.name}.merged.tmp"  # beside the run: a merge never writes into its input
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed merge left
        merge_fn(str(run_dir), str(tmp))
        tmp.replace(merged)
    return str(merged)


__all__ = ["is_pipeline", "read_pipeline", "run_pipeline"]
