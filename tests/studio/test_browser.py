"""The studio in a real browser: Playwright drives Debian's Chromium (headless) against a studio serving a
workspace that holds a tiny random Llama and a small SFT file.

Screenshots go to the test's tmp dir; with TUNEFORGE_DOCS_SCREENSHOT=1 the Train tab with its finished run and
loss chart is also written to docs/studio.png (the manual's picture).
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import qa_rows, save_tiny_model_dir, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "studio.png"
pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_source) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    save_tiny_model_dir(root / "model", "llama", copy.deepcopy(tokenizer_source))
    write_jsonl(root / "sft.jsonl", qa_rows())
    return root


@pytest.fixture(scope="module")
def studio(workspace):
    from tuneforge.studio.server import create, launch

    studio, blocks = create(workspace)
    url = launch(blocks, port=free_port(), block=False)
    yield studio, url
    studio.close(stop_running=True)
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, studio):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(studio[1])
    yield page
    page.close()


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(text)


def choose(page, elem_id: str, text: str) -> None:
    """Type into a (custom-value) drop-down and confirm."""
    box = page.locator(f"#{elem_id} input").first
    box.fill(text)
    box.press("Enter")


def pick(page, elem_id: str, text: str, tries: int = 20) -> None:
    """Add ``text`` to a multiselect drop-down, again until it shows as chosen: a choice typed before the drop-down's
    options arrive (a "Reload list" still on its way) matches nothing and is dropped."""
    for _ in range(tries):
        choose(page, elem_id, text)
        if text in page.inner_text(f"#{elem_id}"):
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"{elem_id}: {text!r} was never chosen")


def wait_text(page, elem_id: str, text: str, timeout: float = 60_000) -> str:
    page.wait_for_function("([id, text]) => { const e = document.getElementById(id); "
                           "return e && e.innerText.includes(text); }", arg=[elem_id, text], timeout=timeout)
    return page.inner_text(f"#{elem_id}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_a_bad_option_is_refused_at_its_field(page, tmp_path):
    open_tab(page, "Train")
    fill(page, "field-run-model", "model")
    fill(page, "field-method-lora-lora_dropout", "1.5")
    page.click("#train-check")
    error = wait_text(page, "train-error", "✗")
    assert "--lora-dropout" in error and "lora_dropout must be in [0, 1)" in error
    assert "field-error" in page.get_attribute("#field-method-lora-lora_dropout", "class")
    page.screenshot(path=tmp_path / "validation.png", full_page=True)
    fill(page, "field-method-lora-lora_dropout", "0.1")
    page.click("#train-command-button")
    wait_text(page, "train-error", "valid")
    command = page.inner_text("#train-command")
    assert "tuneforge train --model model" in command and "--lora-dropout 0.1" in command
    assert "field-error" not in page.get_attribute("#field-method-lora-lora_dropout", "class")


def test_a_path_outside_the_workspace_is_refused_and_not_read(page, workspace, tmp_path, monkeypatch):
    outside = write_jsonl(workspace.parent / "outside.jsonl", qa_rows(2))
    import tuneforge.studio.data_view as data_view

    reads = []
    monkeypatch.setattr(data_view, "read_rows", lambda path: reads.append(path) or iter(()))
    open_tab(page, "Data")
    choose(page, "data-path", str(outside))
    page.click("#data-read")
    assert "outside the workspace" in wait_text(page, "data-status", "error")
    choose(page, "data-path", "../outside.jsonl")
    page.click("#data-read")
    wait_text(page, "data-status", "../outside.jsonl: outside the workspace")
    assert reads == []
    page.screenshot(path=tmp_path / "outside-data.png", full_page=True)
    open_tab(page, "Train")
    fill(page, "field-run-data", "../outside.jsonl")
    page.click("#train-launch")
    assert "outside the workspace" in wait_text(page, "train-error", "✗")
    assert "field-error" in page.get_attribute("#field-run-data", "class")


def test_the_data_tab_shows_format_supervised_tokens_and_errors(page, workspace):
    rows = qa_rows(3) + [{"instruction": "no answer"}]
    (workspace / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    open_tab(page, "Data")
    choose(page, "data-path", "broken.jsonl")
    fill(page, "data-model", "model")
    page.click("#data-read")
    assert "format alpaca" in wait_text(page, "data-status", "format")
    assert "broken.jsonl:4: field 'output' is missing" in wait_text(page, "data-errors", "error")
    assert "zero" in page.inner_text("#data-preview .textspan.hl, #data-preview [class*=hl]") or \
        "zero" in page.inner_text("#data-preview")


def test_the_plan_tab_shows_recommends_table_and_choice(page, workspace):
    from tuneforge.studio.plan import plan

    open_tab(page, "Plan")
    fill(page, "plan-model", "model")
    page.locator("#plan-hardware").get_by_text("GPU", exact=True).click()
    fill(page, "plan-memory", "24")
    page.click("#plan-estimate")
    verdict = wait_text(page, "plan-recommendation", "recommended")
    expected = plan(str(workspace / "model"), 24.0, "task", runs=workspace / "runs")  # recommend's, as the command
    assert expected["combination"] in verdict and expected["why"] in verdict
    table = page.inner_text("#plan-table")
    for row in expected["estimates"]:
        assert row["method"] in table and f"{row['memory_mb']:,}" in table
    page.click("#plan-use")
    open_tab(page, "Train")
    page.wait_for_function("(m) => document.querySelector('#field-run-method input').value === m",
                           arg=expected["method"])


def docs_screenshot(page) -> None:
    """The runs list, the watched run and its charts: the manual's picture."""
    page.locator("#runs-table").scroll_into_view_if_needed()
    scrolled = page.evaluate("window.scrollY")  # bounding boxes are in the viewport, a full-page clip in the page
    top, bottom = page.locator("#runs-table").bounding_box(), page.locator("#run-loss").bounding_box()
    page.screenshot(path=DOCS_SCREENSHOT, full_page=True, clip={
        "x": 0, "y": scrolled + top["y"] - 70, "width": 1400, "height": bottom["y"] + bottom["height"] - top["y"] + 90})


def generate_cli(workspace: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"),
                                                                   os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tuneforge", "generate", *args], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.slow
def test_launch_watch_compare_and_chat(page, studio, workspace, tmp_path):
    open_tab(page, "Train")
    fill(page, "field-run-model", "model")
    fill(page, "field-run-data", "sft.jsonl")
    fill(page, "field-run-max_steps", "3")
    fill(page, "field-run-batch_size", "4")
    fill(page, "field-method-lora-r", "4")
    fill(page, "field-run-learning_rate", "0.05")  # three steps that change the greedy answer
    page.click("#train-settings")  # the accordion with every other run key
    fill(page, "field-run-general_eval", "none")
    fill(page, "field-run-max_length", "64")
    page.click("#train-launch")
    first = re.search(r"queued (\S+)", wait_text(page, "train-error", "queued")).group(1)
    fill(page, "field-method-lora-r", "8")  # a second run queues behind the first
    page.click("#train-launch")
    page.wait_for_function("(first) => { const e = document.getElementById('train-error'); "
                           "return e.innerText.includes('queued') && !e.innerText.includes(first); }", arg=first)
    second = re.search(r"queued (\S+)", page.inner_text("#train-error")).group(1)
    assert first != second
    assert [job.args for job in studio[0].jobs.all()][0][:1] == ["train"]
    choose(page, "runs-select", first)
    wait_text(page, "run-status", f"{first}: finished", timeout=300_000)
    page.wait_for_selector("#run-loss canvas, #run-loss svg")
    page.screenshot(path=tmp_path / "train.png", full_page=True)
    if os.environ.get("TUNEFORGE_DOCS_SCREENSHOT") == "1":
        docs_screenshot(page)
    table = page.inner_text("#runs-table")
    assert first in table and second in table
    choose(page, "runs-select", second)
    wait_text(page, "run-status", f"{second}: finished", timeout=300_000)
    page.reload()  # the list is the run folders: a new page (or a restarted studio) shows the same runs
    open_tab(page, "Train")
    table = wait_text(page, "runs-table", second)
    assert first in table and table.count("finished") == 2

    open_tab(page, "Compare")
    page.click("#compare-reload")
    for run in (first, second):
        pick(page, "compare-runs", run)
    page.click("#compare-go")
    gain = wait_text(page, "compare-gain", "gain")
    assert first in gain and second in gain
    assert "method_options.r" in page.inner_text("#compare-config")
    page.screenshot(path=tmp_path / "compare.png", full_page=True)

    open_tab(page, "Chat")
    prompt = "Say 3 in words."
    choose(page, "chat-run", first)
    fill(page, "chat-max-tokens", "12")
    fill(page, "chat-prompt", prompt)
    page.click("#chat-send")
    wait_text(page, "chat-status", "adapter")
    page.wait_for_function("() => document.querySelector('#chat-tuned-text textarea').value.length > 0")
    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    tuned = page.locator("#chat-tuned-text textarea").input_value()
    base = page.locator("#chat-base-text textarea").input_value()
    assert tuned == generate_cli(workspace, "--adapter", first, "--prompt", prompt, "--max-new-tokens", "12")
    assert base == generate_cli(workspace, "--model", "model", "--prompt", prompt, "--max-new-tokens", "12")
    assert tuned != base  # the adapter is applied (same engine, same prompt, the trained weights)

    open_tab(page, "Export")
    choose(page, "export-run", first)
    page.click("#export-show")
    assert wait_text(page, "export-command", "merge").strip().endswith(f"merge {first} --output {first}-merged")
    page.click("#export-go")
    wait_text(page, "export-jobs", f"{first}-merged")
    wait_text(page, "export-jobs", "finished", timeout=300_000)  # the table follows the job
    assert (workspace / f"{first}-merged" / "config.json").is_file()
