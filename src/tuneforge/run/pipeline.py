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

``OUTPUT/pipeline.json`` records the stages finished, the model each one handed on and each stage's signature (its
settings and a fingerprint of its data files, ``tuneforge.run.reuse``), written before and after every stage. Run the
same command again after a kill and finished stages are reused; the stage that was running resumes from its last
checkpoint (``save_every``) or, without one, starts again. A finished (or checkpointed) stage whose settings or data
changed is refused, naming what changed; ``overwrite: true`` (``--overwrite``) retrains it and every stage after it
(they start from its result), and with nothing changed retrains every stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from .checkpoint import write_text_atomic
from ..config import ConfigError, RunConfig, load_config
from ..outputs import check_output
from .reuse import SettingsChanged, changes, signature

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
    for name in names:
        # A stage trains into OUTPUT/NAME: `..` or `a/b` would put it (and adopt what is there) outside the folder.
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ConfigError(f"{path}: stage {name!r}: a stage name must be a plain folder name (letters, digits, "
                              "_, - and ., not . or ..)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must differ; got {', '.join(names)} (give each a name:)")
    return shared, [{**stage, "name": name} for name, stage in zip(names, stages)]


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
    """Run the stages in order, reusing finished ones whose settings and data are unchanged; the final state
    (stage -> output, and the model handed on)."""
    from ..artifacts.merge import merge_adapter
    from .trainer import train

    train_fn, merge_fn = train_fn or train, merge_fn or (lambda a, o: merge_adapter(a, o))
    source = str(path)
    shared, stages = read_pipeline(path, overrides)
    output = Path(shared.pop("output", "runs/pipeline"))
    overwrite = bool(shared.pop("overwrite", False))
    shared.pop("resume", None)  # a stage resumes by itself when it can
    plan = plan_stages(shared, stages, output, source)
    state = read_state(output)
    # The folder is this pipeline's when it holds its state; anything else in it is the user's to give up.
    check_output(output, inputs=external_inputs(plan, output), overwrite=overwrite or state is not None,
                 flag=f"{source}: output")
    state = state or {"done": {}, "model": None, "signatures": {}}
    first = first_to_train(plan, state, overwrite, source)
    output.mkdir(parents=True, exist_ok=True)
    for i, (stage, config) in enumerate(plan):
        name, run_dir = stage["name"], Path(config.output)
        if i < first:
            log.info("pipeline: stage %s already done (%s), same settings and data", name, run_dir)
        else:
            train_stage(plan[i:], state, output, resume=i == first and not overwrite, train_fn=train_fn)
            state["done"][name] = str(run_dir)
            write_text_atomic(output / STATE_NAME, json.dumps(state, indent=1))
        if stage.get("feed", True) and not config.method_class.trains_base_weights:
            _merged(run_dir, merge_fn)  # again if a kill cut the merge short
        state["model"] = handed_on(plan[:i + 1])
        write_text_atomic(output / STATE_NAME, json.dumps(state, indent=1))
    return state


def plan_stages(shared: dict[str, Any], stages: list[dict], output: Path, source: str
                ) -> list[tuple[dict, RunConfig]]:
    """Every stage's config, built before anything trains (a typo in the last stage fails before the first trains).
    The model each stage starts from is known in advance: the folder the feeding stage before it hands on."""
    planned = {s["name"]: str(output / s["name"]) for s in stages}
    plan: list[tuple[dict, RunConfig]] = []
    for i, stage in enumerate(stages):
        earlier = dict(list(planned.items())[:i])  # {stages.X}: an earlier stage only
        plan.append((stage, stage_config(shared, stage, output, handed_on(plan), earlier, source)))
    return plan


def handed_on(plan: list[tuple[dict, RunConfig]]) -> str | None:
    """The model the last feeding stage of ``plan`` hands on (None: none feeds): a fully fine-tuned stage's folder,
    an adapter stage's merged folder. By absolute path, as the trainer records a local model."""
    for stage, config in reversed(plan):
        if stage.get("feed", True):
            run_dir = Path(config.output)
            return os.path.abspath(run_dir if config.method_class.trains_base_weights else run_dir / "merged")
    return None


def read_state(output: Path) -> dict[str, Any] | None:
    path = output / STATE_NAME
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    state.setdefault("signatures", {})  # a state written before signatures were recorded
    return state


def external_inputs(plan: list[tuple[dict, RunConfig]], output: Path) -> list[str]:
    """The models and data files the user gave (a stage's own input from an earlier stage is inside ``output``)."""
    from ..data.mixing import parse_sources

    found = []
    for _, config in plan:
        found += [config.model, config.eval_data, *(s.file for s in parse_sources(config.data))]
    inside = [Path(config.output).resolve() for _, config in plan]
    return [p for p in found if p and not any(_within(Path(p).resolve(), d) for d in inside)]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def first_to_train(plan: list[tuple[dict, RunConfig]], state: dict[str, Any], overwrite: bool, source: str) -> int:
    """The first stage that trains; every later one trains after it (it starts from that stage's result). The
    stages before it finished with the settings and data they have now. A stage whose finished or checkpointed work
    was made otherwise is refused, naming what changed; ``overwrite`` retrains from it instead, and from the first
    stage when nothing changed (the user asked for the stages again)."""
    from .checkpoint import latest_checkpoint

    for i, (stage, config) in enumerate(plan):
        name, run_dir = stage["name"], Path(config.output)
        if name in state["signatures"] and state["signatures"][name] is None:
            return i  # an earlier stage was retrained after this one finished: it is stale
        recorded, current = state["signatures"].get(name), signature(config)
        if name in state["done"] and recorded == current and _finished(run_dir):
            continue
        if overwrite or not (_finished(run_dir) or latest_checkpoint(run_dir) is not None):
            return i  # asked for, or nothing to lose
        if recorded == current:
            return i  # killed mid-stage: it resumes (from a checkpoint) or starts again
        why = (", ".join(changes(recorded, current)) if name in state["signatures"]
               else f"{run_dir} holds a run this pipeline has no record of")
        raise SettingsChanged(f"{source}: stage {name}: {why}; pass --overwrite to retrain from this stage")
    return 0 if overwrite else len(plan)


def train_stage(remaining: list[tuple[dict, RunConfig]], state: dict[str, Any], output: Path, resume: bool,
                train_fn: Callable[[RunConfig], Any]) -> None:
    """Train the first of ``remaining``; the ones after it are marked stale first (a kill now must not leave them
    looking reusable: they start from this stage's result)."""
    from .checkpoint import latest_checkpoint

    (stage, config), run_dir = remaining[0], Path(remaining[0][1].output)
    name = stage["name"]
    current = signature(config)  # now: files an earlier stage wrote exist
    # A finished run here, not recorded as done, is the one this training replaces (killed before it began).
    resume = (resume and state["signatures"].get(name) == current and latest_checkpoint(run_dir) is not None
              and not _finished(run_dir))
    for later, _ in remaining:
        state["done"].pop(later["name"], None)
        state["signatures"][later["name"]] = None
    state["signatures"][name] = current
    write_text_atomic(output / STATE_NAME, json.dumps(state, indent=1))
    shutil.rmtree(run_dir / "merged", ignore_errors=True)  # made from the result this training replaces
    log.info("pipeline: stage %s (%s %s) -> %s%s", name, config.objective, config.method, run_dir,
             " (resuming)" if resume else "")
    train_fn(config.model_copy(update={"resume": True} if resume else {"overwrite": True}))


def _finished(run_dir: Path) -> bool:
    from .checkpoint import read_run_record

    record = read_run_record(run_dir) if run_dir.is_dir() else None
    return bool(record and record.get("finished"))


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
