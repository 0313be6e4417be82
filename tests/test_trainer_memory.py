"""What a run reports as its peak memory: the process's true peak (the max RSS the OS saw), evaluations after
training included, under names that say what they count; and how long train() took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.run.trainer import memory_line, peak_memory

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCK_MB = 400

# A fresh process (this one's max RSS is whatever earlier tests reached) trains the tiny model; the evaluation
# after training first touches BLOCK_MB of memory and frees it. The reported peak must include that block.
SCRIPT = f"""
import json, logging, sys
import numpy as np
from tuneforge import trainer
from tuneforge.config import load_config

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

measured = {{}}
real = trainer.generation_metric

def evaluation_that_needs_memory(t, examples, base):
    if not base:
        measured["rss_before_block_mb"] = rss_mb()
        block = np.ones({BLOCK_MB} * 2**20, dtype=np.uint8)  # written, so resident
        del block
    return real(t, examples, base)

trainer.generation_metric = evaluation_that_needs_memory
logging.basicConfig(level=logging.INFO)
model, data, output = sys.argv[1:]
config = load_config(None, dict(model=model, data=data, output=output, max_steps=2, batch_size=4, progress=False,
                                eval_split=0.25, eval_generate=False))
result = trainer.train(config)
print(json.dumps({{**measured, **{{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_peak_memory_covers_the_evaluation_after_training(tmp_path, tiny_model_dir, sft_file):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(sft_file), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.splitlines()[-1])
    assert metrics["peak_rss_mb"] >= metrics["rss_before_block_mb"] + 0.9 * BLOCK_MB
    assert metrics["peak_memory_mb"] == metrics["peak_rss_mb"]  # on CPU the old name is the process max RSS
    assert "peak_cuda_allocated_mb" not in metrics
    assert 0 < metrics["train_wall_s"] < 600
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: summary[k] for k in ("peak_rss_mb", "peak_memory_mb", "train_wall_s")} == {
        k: metrics[k] for k in ("peak_rss_mb", "peak_memory_mb", "train_wall_s")}
    assert f"peak memory: process max RSS {metrics['peak_rss_mb']:,.0f} MB" in done.stderr


def test_peak_memory_names_what_each_number_counts():
    cpu = peak_memory(torch.device("cpu"))
    assert set(cpu) == {"peak_rss_mb", "peak_memory_mb"} and cpu["peak_rss_mb"] > 0
    cuda = {"peak_rss_mb": 2400.0, "peak_cuda_allocated_mb": 1612.0, "peak_cuda_reserved_mb": 2048.0,
            "peak_memory_mb": 1612.0}
    assert memory_line(cuda) == ("peak memory: process max RSS 2,400 MB, CUDA max allocated 1,612 MB, "
                                 "max reserved 2,048 MB")
