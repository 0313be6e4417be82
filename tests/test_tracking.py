"""Experiment trackers (--report-to): names are validated with the config, a missing library fails before the model
loads, only rank 0 reports, and what TensorBoard, W&B, MLflow and Trackio record (read back with each project's own
reader, all offline) equals metrics.jsonl, with the config beside it; a failed run is closed as failed."""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path

import pytest

import tuneforge
from conftest import make_tiny_model
from tuneforge.run import tracking
from tuneforge.commands.main import main
from tuneforge.config import ConfigError
from tuneforge.run.tracking import SUMMARY_KEYS, Tracking, TrackerNotInstalled, tracker_names

pytestmark = pytest.mark.usefixtures("single_thread")


def config(tmp_path, data, **overrides):
    values = dict(data=str(data), output=str(tmp_path / "run"), max_steps=3, batch_size=4, learning_rate=1e-2,
                  max_length=64, progress=False, seed=0, warmup_steps=0, eval_split=0.25, eval_every=2)
    values.update(overrides)
    return tuneforge.load_config(None, values)


def train(cfg, tokenizer):
    return tuneforge.train(cfg, make_tiny_model("llama", len(tokenizer)), copy.deepcopy(tokenizer))


def logged(run: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(key, step): value}: the numbers every tracker must hold."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.update({(k, record["step"]): v for k, v in tracking.scalars(record).items()})
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker offline and inside tmp_path: W&B offline mode, MLflow's store under the run (the default when
    no MLFLOW_TRACKING_URI is set), Trackio's local database in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no capture of pytest's redirected streams
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    trackio_dir = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(trackio_dir))
    # Trackio reads TRACKIO_DIR once, when imported; an earlier test may have imported it already.
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "trackio"]:
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", trackio_dir)
    return trackio_dir


# -- names, missing libraries, ranks ------------------------------------------------------------------------


@pytest.mark.parametrize("given, names", [
    (None, []), ("none", []), ("tensorboard", ["tensorboard"]), ("wandb,MLflow", ["wandb", "mlflow"]),
    (["trackio", "tensorboard", "trackio"], ["trackio", "tensorboard"]), ([], [])])
def test_report_to_names(given, names):
    assert tracker_names(given) == names


def test_unknown_tracker_is_a_config_error_naming_it(tmp_path, sft_file):
    with pytest.raises(ConfigError, match=r"report_to.*'wandbb'.*tensorboard, wandb, mlflow, trackio"):
        config(tmp_path, sft_file, report_to="tensorboard,wandbb")
    assert config(tmp_path, sft_file).report_to == []  # none by default


def test_missing_library_fails_before_the_model_loads(tmp_path, sft_file, monkeypatch, capsys):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr("tuneforge.run.trainer.load_model", no_model)
    with pytest.raises(TrackerNotInstalled, match=r'wandb is not installed; pip install "tuneforge\[track\]"'):
        tuneforge.train(config(tmp_path, sft_file, report_to="tensorboard,wandb"))
    rc = main(["train", "--data", str(sft_file), "--output", str(tmp_path / "cli"), "--report-to", "wandb"])
    assert rc == 2 and 'tuneforge[track]' in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


@pytest.fixture
def fresh_wandb():
    """wandb reads its settings once per process (its setup singleton): start and leave this test with none."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.usefixtures("fresh_wandb")
def test_wandb_without_credentials_is_refused_before_anything_is_made(tmp_path, sft_file, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "RANK"):
        monkeypatch.delenv(name, raising=False)
    rc = main(["train", "--model", str(tmp_path / "never-loaded"), "--data", str(sft_file), "--output",
               str(tmp_path / "run"), "--report-to", "wandb"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith("tuneforge: error: report_to wandb: no Weights & Biases credentials")
    assert all(hint in err[-1] for hint in ("wandb login", "WANDB_API_KEY", "WANDB_MODE=offline"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline needs no account
    assert Tracking(["wandb"]).classes == [tracking.WandbTracker]


def test_only_rank_zero_reports(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)  # nothing installed: no error
    assert Tracking(["wandb", "mlflow"]).classes == []
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrackerNotInstalled):
        Tracking(["wandb", "mlflow"])


# -- what each tracker recorded ---------------------------------------------------------------------------


def tensorboard_scalars(run: Path) -> tuple[dict[tuple[str, int], float], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    values = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    return values, events.Tags()["tensors"]


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    values = {(key, m.step): m.value for key in found.data.metrics
              for m in client.get_metric_history(found.info.run_id, key)}
    return found, values


def wandb_records(run: Path) -> list:
    """The records of the offline run's .wandb file: LevelDB-log framing (32 KiB blocks of chunks with a 7-byte
    header: CRC, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B' file header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    [path] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_history(run: Path) -> tuple[dict[tuple[str, int], float], dict[str, float], dict[str, object]]:
    history, summary, config = {}, {}, {}
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.update({(k, items["_step"]): v for k, v in items.items() if not k.startswith("_")})
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return history, summary, config


def trackio_logs(run_name: str):
    from trackio.sqlite_storage import SQLiteStorage

    values = {}
    for row in SQLiteStorage.get_logs("tuneforge", run_name):
        values.update({(k, row["step"]): v for k, v in row.items() if k not in ("step", "timestamp")})
    return values, SQLiteStorage.get_run_config("tuneforge", run_name)


def test_every_tracker_records_what_metrics_jsonl_holds(tmp_path, tokenizer, sft_file, offline):
    result = train(config(tmp_path, sft_file, report_to="tensorboard,wandb,mlflow,trackio"), tokenizer)
    run = result.output
    expected = logged(run)
    # The run logs eval before training (step 0), train steps, an eval mid-run and at the end, and exact match.
    keys = {k for k, _ in expected}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "exact_match_after"} <= keys
    assert {s for k, s in expected if k == "eval_loss"} == {0, 2, 3}
    summary = {k: result.metrics[k] for k in SUMMARY_KEYS}

    # TensorBoard keeps float32.
    scalars, tensors = tensorboard_scalars(run)
    assert {k: v for k, v in scalars.items() if k[0] not in SUMMARY_KEYS} == pytest.approx(expected, rel=1e-6)
    assert {k: v for k, v in scalars.items() if k[0] in SUMMARY_KEYS} == pytest.approx(
        {(k, 3): v for k, v in summary.items()}, rel=1e-6)
    assert "config/text_summary" in tensors

    found, values = mlflow_run(run)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert {k: v for k, v in values.items() if k[0] not in SUMMARY_KEYS} == expected
    assert found.data.params["method"] == "lora" and found.data.params["max_steps"] == "3"
    assert found.data.metrics["peak_memory_mb"] == summary["peak_memory_mb"]

    history, wandb_summary, wandb_config = wandb_history(run)
    assert history == expected  # the records of one step merge into one row
    assert all(wandb_summary[k] == v for k, v in summary.items())
    assert wandb_config["method"] == "lora" and wandb_config["max_steps"] == 3

    trackio_values, trackio_config = trackio_logs("run")
    assert {k: v for k, v in trackio_values.items() if k[0] not in SUMMARY_KEYS} == expected
    assert trackio_config["method"] == "lora" and trackio_config["learning_rate"] == 0.01
    assert list(offline.glob("tuneforge.db"))


def test_a_failed_run_is_closed_as_failed(tmp_path, tokenizer, sft_file, offline, monkeypatch):
    from tuneforge.run.trainer import Trainer

    real_step, calls = Trainer.optimizer_step, []

    def step_then_fail(self, batches, step):
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_step(self, batches, step)

    monkeypatch.setattr(Trainer, "optimizer_step", step_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(config(tmp_path, sft_file, report_to="wandb,tensorboard", eval_generate=False), tokenizer)
    run = tmp_path / "run"
    assert set(logged(run)) == {("eval_loss", 0), *((k, 1) for k in ("loss", "lr", "grad_norm", "units", "tokens",
                                                                      "epoch", "tokens_per_s"))}
    assert wandb_history(run)[0] == logged(run)
    [exit_record] = [r.exit for r in wandb_records(run) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1  # W&B shows the run as failed
    assert tensorboard_scalars(run)[0] == pytest.approx(logged(run), rel=1e-6)  # the writer was flushed and closed
