"""The Plan tab: ``tuneforge recommend`` for the model, hardware and goal picked in the browser (the library's
estimates, calibrated by the finished runs in the workspace as the command calibrates by ``--runs``), and the
hardware this machine has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB_MB = 1024.0
COLUMNS = ["method", "trainable params", "peak memory MB", "s / step", "fits", "basis"]


def detected_gpu() -> tuple[str | None, float | None]:
    """(a name ``recommend`` knows the throughput of, memory in GB) of the first CUDA device; (None, None) without."""
    import torch

    from ..choose import recommend as rec

    if not torch.cuda.is_available():
        return None, None
    properties = torch.cuda.get_device_properties(0)
    name = next((n for n in rec.GPU_BF16_FLOPS if n in properties.name.lower()), None)
    return name, round(properties.total_memory / 2**30, 1)


def plan(model: str, gpu_memory_gb: float | None, goal: str, gpu_name: str | None = None,
         batch_size: int | None = None, max_length: int | None = None, runs: str | Path | None = None,
         ) -> dict[str, Any]:
    """``recommend``'s result for the request, with its table's rows and the report the command prints.
    ``gpu_memory_gb`` None: this machine's CPU and memory. ``runs``: finished runs to calibrate by."""
    from ..choose import recommend as rec

    rec.check_request(goal, batch_size, max_length, gpu_name)
    shape = rec.model_shape(model)
    gpu_mb = None if gpu_memory_gb is None else gpu_memory_gb * GIB_MB
    measured = rec.measured_calibrations(shape, model, runs, gpu_mb is not None, gpu_name) if runs else {}
    result = rec.recommend(shape, goal, gpu_mb, batch_size=batch_size, max_length=max_length, gpu_name=gpu_name,
                           ram_mb=rec.system_ram_mb() if gpu_mb is None else None, calibrations=measured)
    result["rows"] = [[r["method"], f"{r['trainable']:,}", f"{r['memory_mb']:,}",
                       f"{r['step_s']:.3g}" if result["times_known"] else "?",
                       "—" if r["fits"] is None else "yes" if r["fits"] else "no", r["basis"]]
                      for r in result["estimates"]]
    result["situation"] = rec.SITUATIONS[goal]
    result["report"] = rec.format_report(result, shape, "CPU" if gpu_mb is None else f"GPU with {gpu_memory_gb:g} GB")
    return result
