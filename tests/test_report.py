"""The run report: a chart per metric that draws exactly the logged values (train and eval overlaid, runs overlaid;
two points as marks, log axes labelled with plain numbers), one-off values in a table (before → after, percentages,
then forgetting, wall time and peak memory from summary.json), the config keys that differ between runs,
`tuneforge report`, the report path printed by `tuneforge train`, and the HTML page rendered by headless Chromium
with every image decoded and no console error."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tuneforge.run import report
from tuneforge.commands.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, records: list[dict], config: dict, summary: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "tuneforge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def sft_records(scale: float = 1.0) -> list[dict]:
    rows = [{"step": 0, "eval_loss": 2.0 * scale}]
    for step in (1, 2, 3, 4):
        rows.append({"loss": scale / step, "units": 10, "tokens": 40, "grad_norm": 0.5 + step, "step": step,
                     "lr": 1e-3 / step, "epoch": step / 4, "tokens_per_s": 100.0 + step})
    rows[2]["eval_loss"] = 1.5 * scale  # an eval mid-run, in the train record of step 2
    rows.append({"step": 4, "eval_loss": 1.0 * scale})
    rows.append({"step": 4, "exact_match_before": 0.25, "exact_match_after": 0.75, "exact_match_after_seconds": 3.0})
    return rows


CONFIG = {"model": "tiny", "method": "lora", "method_options": {"r": 8, "lora_alpha": 16}, "objective": "sft",
          "learning_rate": 1e-3, "max_steps": 4, "output": "runs/a"}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a = write_run(tmp_path / "a", sft_records(), CONFIG)
    dpo = [{**r, "reward_margin": 0.1 * r["step"]} if "loss" in r else r for r in sft_records(2.0)]
    dpo.insert(1, {"step": 0, "eval_reward_margin": 0.0})
    b = write_run(tmp_path / "b", dpo, {**CONFIG, "objective": "dpo", "method_options": {"r": 16, "lora_alpha": 16},
                                         "output": "runs/b"})
    return [a, b]


def test_charts_every_metric_leading_ones_first(runs):
    loaded = report.load_runs(runs)
    assert report.chart_keys(loaded) == ["loss", "lr", "grad_norm", "tokens_per_s", "reward_margin"]
    # Logged once per run: a table, not a chart. Timings and batch bookkeeping are neither.
    assert report.single_values(loaded) == ["exact_match_after", "exact_match_before"]


def test_a_chart_draws_exactly_the_logged_values(runs):
    from matplotlib.figure import Figure

    loaded = report.load_runs(runs)
    axes = Figure().subplots()
    report.plot_metric(axes, loaded, "loss")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
    assert lines == {
        "a (train)": ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25]), "a (eval)": ([0, 2, 4], [2.0, 1.5, 1.0]),
        "b (train)": ([1, 2, 3, 4], [2.0, 1.0, 2 / 3, 0.5]), "b (eval)": ([0, 2, 4], [4.0, 3.0, 2.0])}
    # One colour per run, train solid and eval dashed.
    colors = {label: line.get_color() for label, line in zip(lines, axes.get_lines())}
    assert colors["a (train)"] == colors["a (eval)"] != colors["b (train)"] == colors["b (eval)"]
    assert {line.get_linestyle() for line in axes.get_lines() if "eval" in line.get_label()} == {"--"}


def test_report_writes_pngs_and_a_self_contained_page(runs, tmp_path):
    page = report.write_report(runs, tmp_path / "out")
    assert page == tmp_path / "out" / "index.html"
    names = sorted(p.name for p in page.parent.glob("*.png"))
    assert names == ["grad_norm.png", "loss.png", "lr.png", "overview.png", "reward_margin.png", "tokens_per_s.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in page.parent.glob("*.png"))
    text = page.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [(page.parent / f"{k}.png").read_bytes() for k in
                                                       ["loss", "lr", "grad_norm", "tokens_per_s", "reward_margin"]]
    assert "src=\"http" not in text and "<link" not in text and "<script" not in text  # nothing to fetch
    # The config table lists what differs (objective, rank, output), not what the runs share.
    config_table = text.split("Config differences")[1]
    for key in ("objective", "method_options.r", "output"):
        assert f"<th>{key}</th>" in config_table
    for key in ("method_options.lora_alpha", "learning_rate", "model"):
        assert f"<th>{key}</th>" not in config_table
    assert "<tr><th>held-out exact match, before → after</th><td>25.0% → 75.0%</td><td>25.0% → 75.0%</td></tr>" in text


def test_two_points_are_marks_not_a_line(tmp_path):
    """An evaluation before and one after training: a dashed line between them would read as a steady decline."""
    from matplotlib.figure import Figure

    records = [{"step": 0, "eval_loss": 2.0}, *({"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)),
               {"step": 4, "eval_loss": 1.0}]
    run = report.load_run(write_run(tmp_path / "a", records, CONFIG))
    axes = Figure().subplots()
    report.plot_metric(axes, [run], "loss")
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines["eval"].get_xdata()) == [0, 4] and list(lines["eval"].get_ydata()) == [2.0, 1.0]
    assert lines["eval"].get_linestyle() == "None" and lines["eval"].get_marker() not in (None, "None", "")
    assert lines["train"].get_linestyle() == "-"  # four points: a line


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True) if t.get_text()]


def test_log_axes_are_labelled_with_plain_numbers(tmp_path):
    """tokens/s rising 40x in the first steps gets a log axis; its labels read "20", "50", not "2×10¹"."""
    from matplotlib.figure import Figure

    records = [{"step": s, "loss": 1.0, "tokens_per_s": v} for s, v in enumerate((5.0, 60.0, 150.0, 200.0), 1)]
    run = report.load_run(write_run(tmp_path / "a", records, CONFIG))
    figure = Figure()
    axes = figure.subplots()
    assert report.plot_metric(axes, [run], "tokens_per_s").endswith("(log scale)")
    figure.savefig(io.BytesIO(), format="png")  # ticks and their labels are made when drawn
    labels = tick_labels(axes.yaxis)
    assert {"10", "100", "20", "50"} <= set(labels)
    assert all(float(label) > 0 for label in labels)  # nothing like "$\mathdefault{6\times10^{1}}$"


def test_final_values_say_before_after_forgetting_wall_time_and_peak_memory(tmp_path):
    summary = {"eval_before_loss": 2.0, "eval_loss": 1.0, "exact_match_before": 0.25, "exact_match_after": 0.96875,
               "general_ppl_before": 10.0, "general_ppl_after": 10.5, "general_loss_before": 2.302,
               "general_loss_after": 2.351, "forgetting": 0.0488, "train_wall_s": 63.4, "peak_rss_mb": 2403.2,
               "peak_memory_mb": 2403.2, "trainable_params": 460800, "attention": "sdpa"}
    records = sft_records()
    records[-1]["exact_match_after"] = 0.96875
    new = write_run(tmp_path / "new", records, CONFIG, summary)
    old = write_run(tmp_path / "old", sft_records(), CONFIG, {"peak_memory_mb": 1612.0})  # before peak_rss_mb
    rows = dict(report.final_rows(report.load_runs([new, old]), ["exact_match_after", "exact_match_before"]))
    assert rows["held-out exact match, before → after"] == ["25.0% → 96.9%", "25.0% → 75.0%"]
    assert rows["held-out loss, before → after"] == ["2 → 1", "2 → 1"]
    assert rows["general-text perplexity, before → after"] == ["10 → 10.5", "—"]
    assert rows["forgetting: general-text loss after − before (> 0: forgot)"] == ["+0.0488", "—"]
    assert rows["wall time, s (load, evaluate, train, save)"] == ["63.4", "—"]
    assert rows["peak memory, MB: process max RSS"] == ["2,403", "—"]
    assert "peak memory, MB" not in rows  # the old name is shown only where no run has the max RSS
    assert not any("general_loss" in label or label.startswith("exact_match") for label in rows)
    alone = dict(report.final_rows([report.load_run(old)], []))
    assert alone["peak memory, MB"] == ["1,612"]
    page = report.write_report([new], tmp_path / "out").read_text()
    assert "<tr><th>held-out exact match, before → after</th><td>25.0% → 96.9%</td></tr>" in page
    assert "<tr><th>peak memory, MB: process max RSS</th><td>2,403</td></tr>" in page


def test_one_run_defaults_to_its_own_directory_and_shows_the_whole_config(runs, capsys):
    assert main(["report", str(runs[0])]) == 0
    page = runs[0] / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(page)
    text = page.read_text()
    assert "<h2>Config</h2>" in text and "<th>method_options.lora_alpha</th><td>16</td>" in text


def test_a_run_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_same_named_runs_are_told_apart(tmp_path):
    first = write_run(tmp_path / "x" / "run", sft_records(), CONFIG)
    second = write_run(tmp_path / "y" / "run", sft_records(), CONFIG)
    assert [r.label for r in report.load_runs([first, second])] == [str(first), str(second)]


@pytest.mark.usefixtures("single_thread")
def test_train_prints_the_report_it_wrote(tmp_path, tiny_model_dir, sft_file, capsys):
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(sft_file), "--output", str(tmp_path / "run"),
               "--max-steps", "2", "--batch-size", "4", "--progress", "false", "--eval-split", "0.25",
               "--eval-generate", "false"])
    out = capsys.readouterr().out
    assert rc == 0
    page = tmp_path / "run" / "report" / "index.html"
    assert out.splitlines()[-1] == f"report: {page}"
    assert (page.parent / "loss.png").read_bytes().startswith(PNG_MAGIC)


# -- the page in a browser -----------------------------------------------------------------------------------

# Injected first into a copy of the page: records script errors, console.error calls and failed resource loads,
# then, once everything has loaded, each image's decoded width, into the DOM that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
addEventListener("error", e => __errors.push(String(e.message || (e.target && e.target.src) || e)), true);
const consoleError = console.error;
console.error = (...args) => { __errors.push(args.join(" ")); consoleError(...args); };
addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({widths: [...document.images].map(i => i.naturalWidth), errors: __errors});
  document.body.appendChild(out);
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[dict, str]:
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    profile = tmp_path / f"profile-{page.stem}"
    profile.mkdir()
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout)
    assert found, f"chromium printed no probe (rc {done.returncode}): {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"')), "\n".join(console)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    page = report.write_report(runs, tmp_path / "out")
    probe, console = render(page, tmp_path)
    assert probe == {"widths": [640] * 5, "errors": []}  # five charts, each 6.4 in at 100 dpi
    assert console == ""
    # The probe does see a broken image and a script error: the check above can fail.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<img src='data:image/png;base64,AAAA'>"
                                               "<script>missing()</script></body>"))
    probe, console = render(broken, tmp_path)
    assert probe["widths"][-1] == 0 and len(probe["errors"]) == 2 and "missing is not defined" in console


def test_metric_names_with_slashes_chart_into_the_report_folder(tmp_path):
    """GRPO logs ``clip_ratio/low`` and ``rewards/0``: the chart files must not name folders that do not exist."""
    records = [{"step": s, "loss": 1.0 / s, "clip_ratio/low": 0.01 * s, "rewards/0": 0.1 * s} for s in (1, 2, 3)]
    run = write_run(tmp_path / "grpo", records, CONFIG)
    page = report.write_report([run])
    names = {p.name for p in page.parent.iterdir()}
    assert {"clip_ratio_low.png", "rewards_0.png"} <= names
