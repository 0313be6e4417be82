"""What each button of the studio does, as plain Python over the library (the Gradio layout in ``ui.py`` only wires
widgets to these methods, so they are tested without a browser).

Every path a form names goes through :class:`~tuneforge.studio.workspace.Workspace` first; a path outside the
workspace is an error shown where it was typed, and nothing is read.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..flags import parse_overrides
from .form import FormField, Filled, all_fields, check
from .jobs import ACTIVE, Job, Jobs
from .runs import RunInfo, find_runs, read_metrics, run_info, series
from .workspace import Workspace

# Form values the studio starts with where the command line's default does not suit a browser: a progress bar
# would fill the job's log with carriage returns (the chart shows progress).
STUDIO_DEFAULTS = {"progress": False}
RUN_COLUMNS = ["run", "state", "method", "objective", "step", "last loss", "command"]
EXPORT_FORMATS = ("merge", "gguf", "ollama", "vllm")


class Studio:
    def __init__(self, workspace: Workspace, jobs: Jobs, chat: Any = None):
        self.workspace, self.jobs = workspace, jobs
        self.fields: list[FormField] = all_fields()
        if chat is None:
            from .chat import ChatEngine

            chat = ChatEngine()
        self.chat = chat

    # -- train ---------------------------------------------------------------------------------------
    def initial_values(self) -> list[Any]:
        starts = {**STUDIO_DEFAULTS, "output": self.next_output()}
        return [starts.get(f.option, f.initial()) if f.section == "run" else f.initial() for f in self.fields]

    def next_output(self, stem: str = "runs/studio") -> str:
        taken = {job.output for job in self.jobs.all()}
        number = 1
        while f"{stem}-{number}" in taken or (self.workspace.root / f"{stem}-{number}").exists():
            number += 1
        return f"{stem}-{number}"

    def check_form(self, values: list[Any]) -> Filled:
        """The form's command, its paths confined to the workspace, validated as `tuneforge train` validates."""
        filled = check(self.fields, values)
        try:
            self.check_paths(parse_overrides(list(filled.tokens)))
        except ConfigError as e:  # outside the workspace: "KEY PATH: outside ..."
            key = str(e).split(" ", 1)[0]
            named = next((f for f in self.fields if f.section == "run" and f.option == key), None)
            filled.config, filled.error, filled.field = None, str(e), named
        except ValueError as e:  # a malformed value (a data mix's weights): the config check above names it too
            filled.config, filled.error = None, filled.error or str(e)
        return filled

    def check_paths(self, overrides: dict[str, Any]) -> None:
        """Every path the run would read or write lies in the workspace (ConfigError naming the key otherwise); the
        library's own readings of each key say which of its values are paths."""
        from ..data.mixing import GENERAL_EVAL, general_eval_file, general_eval_tasks, parse_sources
        from ..inference.benchmarks import local_task_paths

        ws = self.workspace
        if overrides.get("model") is not None:
            ws.model_name(str(overrides["model"]))
        for source in parse_sources(overrides.get("data")):
            ws.data_path(source.path, "data")
        if overrides.get("eval_data") is not None:
            ws.data_path(str(overrides["eval_data"]), "eval_data")
        general = overrides.get("general_eval")
        if isinstance(general, str):
            file = general_eval_file(general)
            if file is not None and general != GENERAL_EVAL:
                ws.data_path(file, "general_eval")
            for task in local_task_paths(general_eval_tasks(general)):
                ws.resolve(task, "general_eval")
        ws.resolve(str(overrides.get("output", "runs/demo")), "output")

    def launch(self, values: list[Any]) -> tuple[Filled, Job | None]:
        """Queue the form's run (``tuneforge train TOKENS`` in the workspace) when it validates."""
        filled = self.check_form(values)
        if filled.error:
            return filled, None
        output = self.workspace.relative(self.workspace.resolve(filled.config.output, "output"))
        return filled, self.jobs.submit(["train", *filled.tokens], output)

    # -- runs ----------------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        return [run_info(self.workspace, folder) for folder in find_runs(self.workspace)]

    def runs_table(self) -> list[list[Any]]:
        """Run folders on disk, and the queued (or failed-to-start) jobs whose folder does not exist yet."""
        jobs = {job.output: job for job in self.jobs.all() if job.args[:1] == ["train"]}
        rows = []
        for run in self.runs():
            job = jobs.pop(run.path, None)
            state = job.state if job is not None and job.state in ACTIVE and run.state != "running" else run.state
            rows.append([run.path, state, run.method, run.objective, run.progress,
                         "" if run.loss is None else f"{run.loss:.4f}", job.command if job else ""])
        for job in reversed(list(jobs.values())):
            rows.insert(0, [job.output, job.state, "", "", "", "", job.command])
        return rows

    def job_for(self, output: str) -> Job | None:
        matching = [job for job in self.jobs.all() if job.output == output]
        return matching[-1] if matching else None

    def run_view(self, run: str) -> dict[str, Any]:
        """A run's live view: its state line, its loss / eval-loss and learning-rate points, the job's log tail."""
        if not run:
            return {"status": "", "loss": [], "lr": [], "log": ""}
        folder = self.workspace.resolve(run, "run")
        job = self.job_for(run)
        if folder.is_dir():
            info = run_info(self.workspace, folder)
            state = job.state if job and job.state in ACTIVE and info.state != "running" else info.state
            loss = "" if info.loss is None else f", loss {info.loss:.4f}"
            status = f"**{run}**: {state}, step {info.progress}{loss}"
        else:
            status = f"**{run}**: {job.state if job else 'no such run'}"
        records = read_metrics(folder)
        return {"status": status, "loss": series(records, ("loss", "eval_loss")), "lr": series(records, ("lr",)),
                "log": self.jobs.tail(job.id) if job else ""}

    def stop(self, run: str) -> str:
        job = self.job_for(run)
        if job is None or job.state not in ACTIVE:
            return f"{run}: nothing to stop (the studio stops the runs it started)"
        job = self.jobs.stop(job.id)
        return f"{run}: stop requested ({job.state})"

    def resume(self, run: str) -> str:
        """Queue ``tuneforge train RUN/tuneforge.yaml --resume``: an unfinished run (stopped, killed, or started from
        the command line) goes on from its newest checkpoint with the settings it was started with."""
        folder = self.workspace.resolve(run, "run")
        info = run_info(self.workspace, folder)
        if info.state != "stopped":
            return f"{run}: {info.state}; only a stopped run resumes"
        if any(job.output == info.path and job.state in ACTIVE for job in self.jobs.all()):
            return f"{run}: already queued"
        job = self.jobs.submit(["train", f"{info.path}/tuneforge.yaml", "--resume", "--progress", "false"], info.path)
        return f"{run}: resume queued (`{job.command}`)"

    # -- data ----------------------------------------------------------------------------------------
    def upload(self, temporary: str) -> str:
        """Copy an uploaded file into the workspace's ``uploads/``; its path there."""
        target_dir = self.workspace.resolve("uploads")
        target_dir.mkdir(exist_ok=True)
        name = re.sub(r"[^\w.-]", "_", Path(temporary).name)
        shutil.copyfile(temporary, target_dir / name)
        return self.workspace.relative(target_dir / name)

    def read_data(self, path: str, data_format: str, model: str, objective: str | None, index: int,
                  max_length: int) -> dict[str, Any]:
        from ..data.template import ensure_chat_template
        from ..models.loading import DEFAULT_MODEL, load_tokenizer
        from ..objectives.base import get_objective
        from .data_view import highlighted, measure, read_data

        source = self.workspace.data_path(path)
        report = read_data(str(self.workspace.root / source) if Path(self.workspace.root / source).exists()
                           else source, data_format)
        tokenizer = load_tokenizer(self.local_model(model) if model else DEFAULT_MODEL)
        ensure_chat_template(tokenizer)
        # As `tuneforge data preview --objective`: one that trains on text records supervises every token.
        as_text = bool(objective) and "text" in get_objective(str(objective)).kinds
        measure(report, tokenizer, as_text)
        shown = report.examples[index] if 0 <= index < len(report.examples) else None
        return {"format": report.format, "records": report.records, "stats": report.stats(max_length),
                "errors": [self._shown_path(e) for e in report.errors],
                "rows": highlighted(tokenizer, shown, as_text) if shown else [],
                "source": self._shown_path(shown.source) if shown else ""}

    def local_model(self, text: str) -> str:
        """A model field as the library loads it: a workspace folder by absolute path (the studio's own working
        directory is not the workspace), a name as it is."""
        name = self.workspace.model_name(text)
        local = self.workspace.root / name
        return str(local) if local.exists() else name

    def _shown_path(self, text: str) -> str:
        """Messages name files relative to the workspace, as the user typed them."""
        return text.replace(str(self.workspace.root) + "/", "")

    # -- compare -------------------------------------------------------------------------------------
    def compare(self, runs: list[str]) -> dict[str, Any]:
        """The report's charts and tables for the chosen runs, and compare's gain / cost table for the finished."""
        from ..choose import compare as compare_module
        from ..run import report

        if not runs:
            raise ConfigError("pick at least one run")
        folders = [self.workspace.resolve(run, "run") for run in runs]
        paths: list[str | Path] = list(folders)
        loaded = report.load_runs(paths)
        charts = [report.draw_chart(loaded, key) for key in report.chart_keys(loaded)]
        finals = report.final_rows(loaded, report.single_values(loaded))
        differences = report.config_differences(loaded)
        rows = [compare_module.read_row(run, folder) for run, folder in zip(runs, folders)
                if (folder / compare_module.SUMMARY_NAME).is_file()]
        return {"labels": [run.label for run in loaded], "charts": [(png_image(c.png), c.title) for c in charts],
                "finals": [[label, *cells] for label, cells in finals],
                "config": [[key, *[cell(v) for v in values]] for key, values in differences.items()],
                "gain": compare_module.markdown(rows) if rows else "no finished run among these (summary.json)"}

    # -- chat ----------------------------------------------------------------------------------------
    def chat_base(self, run: str, model: str) -> tuple[str, str | None]:
        """(the base to load, the run folder whose adapter to add): the run's recorded base unless one is given."""
        from ..inference.loading import default_model, is_full_model_dir

        folder = self.workspace.resolve(run, "run") if run else None
        if folder is not None and is_full_model_dir(folder):  # full fine-tuning: the run is the model
            return str(folder), None
        # The run records a local base by absolute path: inside the workspace it loads, outside it is refused.
        return self.local_model(model or default_model(folder, None)), str(folder) if folder else None

    # -- export --------------------------------------------------------------------------------------
    def export_args(self, run: str, fmt: str, output: str, dtype: str) -> list[str]:
        """The command for an export: ``merge`` (a plain HF model) or ``export --format gguf|ollama|vllm``."""
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"format: one of {', '.join(EXPORT_FORMATS)}")
        folder = self.workspace.relative(self.workspace.resolve(run, "run"))
        target = self.workspace.relative(self.workspace.resolve(output or default_export(folder, fmt), "output"))
        if fmt == "merge":
            return ["merge", folder, "--output", target]
        return ["export", folder, "--format", fmt, "--output", target, *(["--dtype", dtype] if fmt == "gguf" else [])]

    def export(self, run: str, fmt: str, output: str, dtype: str) -> Job:
        args = self.export_args(run, fmt, output, dtype)
        return self.jobs.submit(args, args[args.index("--output") + 1])

    def export_jobs(self) -> list[list[Any]]:
        return [[job.output, job.state, job.command] for job in reversed(self.jobs.all()) if job.args[0] != "train"]

    def close(self, stop_running: bool = False) -> None:
        self.jobs.close(stop_running)
        self.chat.close()


def default_export(run: str, fmt: str) -> str:
    return f"{run}-merged" if fmt == "merge" else f"{run}.gguf" if fmt == "gguf" else f"{run}-{fmt}"


def cell(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))
