"""The studio's page: Gradio Blocks wired to :class:`~tuneforge.studio.actions.Studio`. Layout only; what a button
does is a Studio method. Widgets carry ``elem_id`` s (``train-launch``, ``field-method-lora-r`` ...) that the
browser tests and a user's own scripts can address."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..errors import TuneforgeError
from .actions import EXPORT_FORMATS, RUN_COLUMNS, Studio
from .form import FormField
from .plan import COLUMNS as PLAN_COLUMNS

# The fields at the top of the Train tab; every other run field sits under "Training settings".
MAIN_FIELDS = ("model", "data", "method", "objective", "output", "max_steps", "learning_rate", "batch_size")
USER_ERRORS = (TuneforgeError, OSError, ValueError, KeyError)
REFRESH_S = 2.0
CSS = ".field-error input, .field-error textarea, .field-error select { border-color: #d33 !important; }"


def build(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="tuneforge studio", analytics_enabled=False) as blocks:
        gr.Markdown(f"# tuneforge studio\nworkspace: `{studio.workspace.root}`", elem_id="header")
        with gr.Tabs():
            with gr.Tab("Plan", id="plan"):
                plan_outputs = _plan_tab(studio)
            with gr.Tab("Data", id="data"):
                _data_tab(studio)
            with gr.Tab("Train", id="train"):
                widgets = _train_tab(studio)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(studio)
            with gr.Tab("Chat", id="chat"):
                _chat_tab(studio)
            with gr.Tab("Export", id="export"):
                _export_tab(studio)
        use_plan, method, objective = plan_outputs
        use_plan.click(lambda m, o: (m, o), [method, objective], [widgets["method"], widgets["objective"]])
    return blocks


# -- plan ------------------------------------------------------------------------------------------------------


def _plan_tab(studio: Studio):
    from ..choose import recommend as rec
    from .plan import detected_gpu, plan

    gpu_name, gpu_gb = detected_gpu()
    found = f"{gpu_name or 'a GPU'} with {gpu_gb} GB" if gpu_gb else "no GPU"
    with gr.Row():
        model = gr.Textbox(value=_default_model(), label="model", info="embedded name, local folder (in the "
                           "workspace) or hub id", elem_id="plan-model")
        goal = gr.Radio(list(rec.SITUATIONS), value="task", label="goal",
                        info="; ".join(f"{k}: {v}" for k, v in rec.SITUATIONS.items()), elem_id="plan-goal")
    with gr.Row():
        hardware = gr.Radio(["no GPU", "GPU"], value="GPU" if gpu_gb else "no GPU", label="hardware",
                            info=f"detected: {found}",
                            elem_id="plan-hardware")
        memory = gr.Number(value=gpu_gb or 24, label="GPU memory, GB", elem_id="plan-memory")
        name = gr.Dropdown(["", *rec.GPU_BF16_FLOPS], value=gpu_name or "", label="GPU (for the time estimate)",
                           elem_id="plan-gpu")
        default_batch, default_length = rec.train_defaults()
        batch = gr.Number(value=default_batch, precision=0, label="batch size", elem_id="plan-batch")
        length = gr.Number(value=default_length, precision=0, label="max length", elem_id="plan-length")
    estimate = gr.Button("Estimate", variant="primary", elem_id="plan-estimate")
    table = gr.Dataframe(headers=PLAN_COLUMNS, label="memory and time per method (recommend's model, calibrated by "
                         "the workspace's finished runs)", interactive=False, elem_id="plan-table")
    verdict = gr.Markdown(elem_id="plan-recommendation")
    command = gr.Code(label="run", language="shell", elem_id="plan-command")
    method, objective = gr.State(), gr.State()
    use = gr.Button("Use this combination in Train", elem_id="plan-use")

    def run(model_name, goal_name, where, gb, gpu, batch_size, max_length):
        try:
            result = plan(studio.local_model(model_name), None if where == "no GPU" else float(gb), goal_name,
                          gpu or None, int(batch_size), int(max_length), runs=studio.workspace.root / "runs")
        except USER_ERRORS as e:
            return [], f"**error:** {e}", "", None, None
        setup = f", {result['setup'].describe()}" if result["setup"] else ""
        lines = [f"**situation:** {result['situation']}",
                 f"**recommended:** {result['combination']}{setup} — {result['why']}",
                 *[f"**warning:** {result['impractical']}" for _ in [1] if result.get("impractical")],
                 *[f"note: {note}" for note in result["notes"]]]
        return (result["rows"], "\n\n".join(lines), result["run"] or "# nothing fits on this device",
                result["method"], result["objectives"][0])

    estimate.click(run, [model, goal, hardware, memory, name, batch, length],
                   [table, verdict, command, method, objective])
    return use, method, objective


def _objective_names() -> list[str]:
    from ..objectives.base import OBJECTIVES

    return OBJECTIVES.names()


def _default_model() -> str:
    from ..models.loading import DEFAULT_MODEL

    return DEFAULT_MODEL


# -- data ------------------------------------------------------------------------------------------------------


def _data_tab(studio: Studio) -> None:
    from ..data.formats import FORMATS

    with gr.Row():
        path = gr.Dropdown(["demo", "demo:eval", *studio.workspace.data_files()], value="demo",
                           allow_custom_value=True, label="data file (in the workspace) or bundled set",
                           elem_id="data-path")
        upload = gr.UploadButton("Upload into workspace/uploads", elem_id="data-upload")
        fmt = gr.Dropdown(["auto", *FORMATS], value="auto", label="format", elem_id="data-format")
    with gr.Row():
        model = gr.Textbox(value=_default_model(), label="tokenizer of model", elem_id="data-model")
        objective = gr.Dropdown(["", *_objective_names()], value="",
                                label="objective (one that trains on text, pretrain: every token)",
                                elem_id="data-objective")
        index = gr.Number(value=0, precision=0, label="record", elem_id="data-index")
        length = gr.Number(value=512, precision=0, label="max length", elem_id="data-max-length")
    show = gr.Button("Read", variant="primary", elem_id="data-read")
    status = gr.Markdown(elem_id="data-status")
    rows = gr.HighlightedText(label="rendered record: supervised tokens highlighted", combine_adjacent=True,
                              color_map={"supervised": "green", "answer": "gray"}, elem_id="data-preview")
    stats = gr.Dataframe(headers=["statistic", "value"], label="token lengths", interactive=False,
                         elem_id="data-stats")
    errors = gr.Markdown(elem_id="data-errors")

    def read(data, data_format, model_name, objective_name, record, max_length):
        try:
            result = studio.read_data(data, data_format, model_name, objective_name, int(record or 0),
                                      int(max_length or 512))
        except USER_ERRORS as e:
            return f"**error:** {e}", [], [], ""
        head = f"format **{result['format']}**, {result['records']} records read; showing {result['source']}"
        problems = "\n".join(f"- `{e}`" for e in result["errors"])
        return (head, result["rows"], [[k, v] for k, v in result["stats"].items()],
                f"**{len(result['errors'])} data error(s):**\n{problems}" if problems else "no data errors")

    show.click(read, [path, fmt, model, objective, index, length], [status, rows, stats, errors])

    def uploaded(file):
        saved = studio.upload(file if isinstance(file, str) else file.name)
        return gr.update(choices=["demo", "demo:eval", *studio.workspace.data_files()], value=saved)

    upload.upload(uploaded, upload, path)


# -- train -----------------------------------------------------------------------------------------------------


def _field_widget(field: FormField, value: Any, visible: bool = True):
    info = f"{field.help} [{field.flag}, default: {field.initial() if field.default is not None else 'unset'}]"
    common: dict[str, Any] = dict(label=field.label, info=info, elem_id=field.elem_id, visible=visible)
    if field.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if field.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, **common)
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=value, **common)
    return gr.Textbox(value=value, **common)


def _grid(pairs: list[tuple[int, FormField]], values: list[Any], widgets: list, per_row: int = 3) -> None:
    for start in range(0, len(pairs), per_row):
        with gr.Row():
            for index, field in pairs[start:start + per_row]:
                widgets[index] = _field_widget(field, values[index])


def _train_tab(studio: Studio) -> dict[str, Any]:
    fields, values = studio.fields, studio.initial_values()
    widgets: list[Any] = [None] * len(fields)
    run_fields = [(i, f) for i, f in enumerate(fields) if f.section == "run"]
    main = [(i, f) for i, f in run_fields if f.option in MAIN_FIELDS]
    main.sort(key=lambda pair: MAIN_FIELDS.index(pair[1].option))
    _grid(main, values, widgets, per_row=4)
    with gr.Accordion("Training settings (every run key)", open=False, elem_id="train-settings"):
        _grid([(i, f) for i, f in run_fields if f.option not in MAIN_FIELDS], values, widgets)
    groups: dict[str, Any] = {}
    chosen = {values[i] for i, f in main if f.option in ("method", "objective")}
    for kind in ("method", "objective"):
        sections = dict.fromkeys(f.section for f in fields if f.section.startswith(kind + ":"))
        for section in sections:
            owner = section.partition(":")[2]
            with gr.Accordion(f"{kind} options: {owner}", open=True, visible=owner in chosen,
                              elem_id=f"group-{kind}-{owner}") as group:
                _grid([(i, f) for i, f in enumerate(fields) if f.section == section], values, widgets)
            groups[section] = group
    by_option = {f.option: widgets[i] for i, f in run_fields}
    for kind in ("method", "objective"):
        owned = [s for s in groups if s.startswith(kind + ":")]
        by_option[kind].change(lambda name, owned=owned: [gr.update(visible=s.endswith(":" + str(name)))
                                                          for s in owned],
                               by_option[kind], [groups[s] for s in owned])
    with gr.Row():
        check_button = gr.Button("Check", elem_id="train-check")
        command_button = gr.Button("Copy as command / YAML", elem_id="train-command-button")
        launch = gr.Button("Launch", variant="primary", elem_id="train-launch")
    error = gr.Markdown(elem_id="train-error")
    command = gr.Code(label="command (runs in the workspace)", language="shell", elem_id="train-command")
    with gr.Accordion("YAML: the resolved config (tuneforge train THIS.yaml)", open=False):
        config_yaml = gr.Code(language="yaml", elem_id="train-yaml")
    runs = _runs_panel(studio)

    def feedback(filled):
        marks = [gr.update(elem_classes=["field-error"] if f is filled.field else []) for f in fields]
        text = "" if not filled.error else (f"**✗ {filled.field.flag if filled.field else 'config'}:** "
                                            f"{filled.error}")
        return [text or "✓ valid", filled.command, filled.yaml, *marks]

    outputs = [error, command, config_yaml, *widgets]

    def on_check(*form):
        return feedback(studio.check_form(list(form)))

    def on_launch(*form):
        filled, job = studio.launch(list(form))
        result = feedback(filled)
        if job is None:
            return [*result, gr.update(), gr.update(), gr.update()]
        output_index = next(i for i, f in enumerate(fields) if f.section == "run" and f.option == "output")
        result[0] = f"✓ queued `{job.output}` (job {job.id})"
        result[3 + output_index] = gr.update(value=studio.next_output())
        return [*result, gr.update(value=studio.runs_table()), gr.update(choices=_run_choices(studio),
                                                                         value=job.output), job.output]

    check_button.click(on_check, widgets, outputs)
    command_button.click(on_check, widgets, outputs)
    launch.click(on_launch, widgets, [*outputs, runs["table"], runs["select"], runs["selected"]])
    return {"method": by_option["method"], "objective": by_option["objective"]}


def _run_choices(studio: Studio) -> list[str]:
    return [row[0] for row in studio.runs_table()]


def _runs_panel(studio: Studio) -> dict[str, Any]:
    gr.Markdown("## Runs (every run folder in the workspace)")
    table = gr.Dataframe(value=studio.runs_table(), headers=RUN_COLUMNS, interactive=False, elem_id="runs-table")
    selected = gr.State("")
    with gr.Row():
        select = gr.Dropdown(_run_choices(studio), value=None, allow_custom_value=True, label="watch run",
                             elem_id="runs-select")
        stop = gr.Button("Stop", variant="stop", elem_id="runs-stop")
        resume = gr.Button("Resume", elem_id="runs-resume")
    action = gr.Markdown(elem_id="run-action")
    status = gr.Markdown(elem_id="run-status")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="value", color="series", title="loss (train, eval)", elem_id="run-loss")
        lr = gr.LinePlot(x="step", y="value", color="series", title="learning rate", elem_id="run-lr")
    log = gr.Textbox(label="log", lines=8, max_lines=16, autoscroll=True, elem_id="run-log")
    timer = gr.Timer(REFRESH_S)

    def view(run):
        shown = studio.run_view(run or "")
        return (shown["status"], _frame(shown["loss"]), _frame(shown["lr"]), shown["log"])

    def refresh(run):
        return (studio.runs_table(), gr.update(choices=_run_choices(studio)), *view(run))

    select.change(lambda run: (run, *view(run)), select, [selected, status, loss, lr, log])
    timer.tick(refresh, selected, [table, select, status, loss, lr, log])
    stop.click(lambda run: studio.stop(run) if run else "pick a run", selected, action)
    resume.click(lambda run: studio.resume(run) if run else "pick a run", selected, action)
    return {"table": table, "select": select, "selected": selected}


def _frame(points: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(points, columns=["step", "value", "series"])


# -- compare ---------------------------------------------------------------------------------------------------


def _compare_tab(studio: Studio) -> None:
    with gr.Row():
        picked = gr.Dropdown(_run_choices(studio), multiselect=True, label="runs", elem_id="compare-runs")
        reload = gr.Button("Reload list", elem_id="compare-reload")
    go = gr.Button("Compare", variant="primary", elem_id="compare-go")
    status = gr.Markdown(elem_id="compare-status")
    gain = gr.Markdown(elem_id="compare-gain")
    finals = gr.Dataframe(label="final values (report)", interactive=False, elem_id="compare-finals")
    charts = gr.Gallery(label="charts (report)", columns=2, object_fit="contain", height="auto",
                        elem_id="compare-charts")
    config = gr.Dataframe(label="config differences", interactive=False, elem_id="compare-config")

    def run(runs):
        try:
            result = studio.compare(list(runs or []))
        except USER_ERRORS as e:
            return f"**error:** {e}", "", None, [], None
        head = ["", *result["labels"]]
        return ("", "### gain and cost (compare)\n" + result["gain"], pd.DataFrame(result["finals"], columns=head),
                result["charts"], pd.DataFrame(result["config"], columns=["key", *result["labels"]]))

    go.click(run, picked, [status, gain, finals, charts, config])
    reload.click(lambda: gr.update(choices=_run_choices(studio)), None, picked)


# -- chat ------------------------------------------------------------------------------------------------------


def _chat_tab(studio: Studio) -> None:
    with gr.Row():
        run = gr.Dropdown(_run_choices(studio), allow_custom_value=True, label="trained run (adapter)",
                          elem_id="chat-run")
        base = gr.Textbox(label="base model (default: the run's)", elem_id="chat-base-model")
        tokens = gr.Number(value=128, precision=0, label="max new tokens", elem_id="chat-max-tokens")
        temperature = gr.Number(value=0.0, label="temperature (0: greedy)", elem_id="chat-temperature")
        reload = gr.Button("Reload list", elem_id="chat-reload")
    with gr.Row():
        base_chat = gr.Chatbot(label="base", elem_id="chat-base")
        tuned_chat = gr.Chatbot(label="trained", elem_id="chat-tuned")
    with gr.Row():  # the answers as plain text (the bubbles render markdown)
        base_text = gr.Textbox(label="base's last answer, as text", buttons=["copy"], elem_id="chat-base-text")
        tuned_text = gr.Textbox(label="trained's last answer, as text", buttons=["copy"], elem_id="chat-tuned-text")
    prompt = gr.Textbox(label="prompt", elem_id="chat-prompt")
    send = gr.Button("Send", variant="primary", elem_id="chat-send")
    status = gr.Markdown(elem_id="chat-status")

    async def answer(run_name, base_name, max_tokens, temp, text, base_history, tuned_history):
        try:  # loading takes seconds: off the event loop, which keeps serving the other tabs
            model, folder = studio.chat_base(run_name, base_name)
            registry = await asyncio.to_thread(studio.chat.use, model)
            adapter = await asyncio.to_thread(studio.chat.adapter, Path(folder), run_name) if folder else None
        except USER_ERRORS as e:
            yield base_history, tuned_history, "", "", f"**error:** {e}"
            return
        user = {"role": "user", "content": text}
        sides = [list(base_history or []) + [user], list(tuned_history or []) + [user]]
        conversations = [[{"role": m["role"], "content": _content(m)} for m in side] for side in sides]
        adapters = [None, adapter] if adapter else [None]
        async for texts in studio.chat.side_by_side(conversations[:len(adapters)], adapters, int(max_tokens),
                                                    float(temp)):
            texts = [t.strip() for t in texts] + [""]  # as `tuneforge generate` prints an answer
            shown = [side + [{"role": "assistant", "content": t}] for side, t in zip(sides, texts)]
            yield (shown[0], shown[1] if adapter else tuned_history, texts[0], texts[1],
                   f"base `{registry.base_name}`" + (f", adapter `{adapter}`" if adapter else ""))

    send.click(answer, [run, base, tokens, temperature, prompt, base_chat, tuned_chat],
               [base_chat, tuned_chat, base_text, tuned_text, status])
    reload.click(lambda: gr.update(choices=_run_choices(studio)), None, run)


def _content(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, list):  # Gradio's message parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


# -- export ----------------------------------------------------------------------------------------------------


def _export_tab(studio: Studio) -> None:
    with gr.Row():
        run = gr.Dropdown(_run_choices(studio), allow_custom_value=True, label="run", elem_id="export-run")
        fmt = gr.Radio(list(EXPORT_FORMATS), value="merge", label="format", elem_id="export-format")
        dtype = gr.Dropdown(["f16", "bf16", "f32", "q8_0"], value="f16", label="GGUF type", elem_id="export-dtype")
        output = gr.Textbox(label="output (default beside the run)", elem_id="export-output")
    with gr.Row():
        show = gr.Button("Show command", elem_id="export-show")
        go = gr.Button("Export", variant="primary", elem_id="export-go")
        reload = gr.Button("Reload list", elem_id="export-reload")
    command = gr.Code(language="shell", label="command", elem_id="export-command")
    jobs = gr.Dataframe(value=studio.export_jobs(), headers=["output", "state", "command"], interactive=False,
                        elem_id="export-jobs")

    def shown(*args):
        try:
            return "tuneforge " + " ".join(studio.export_args(*args))
        except USER_ERRORS as e:
            return f"# error: {e}"

    def queue(*args):
        try:
            job = studio.export(*args)
        except USER_ERRORS as e:
            return f"# error: {e}", studio.export_jobs()
        return job.command, studio.export_jobs()

    gr.Timer(REFRESH_S).tick(studio.export_jobs, None, jobs)
    show.click(shown, [run, fmt, output, dtype], command)
    go.click(queue, [run, fmt, output, dtype], [command, jobs])
    reload.click(lambda: (gr.update(choices=_run_choices(studio)), studio.export_jobs()), None, [run, jobs])
