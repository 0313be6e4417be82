"""The Plan tab: ``tuneforge recommend`` for the model, hardware and goal picked in the browser (the library's
estimates and recommendation, nothing recomputed here), and the hardware this machine has."""

from __future__ import annotations

from typing import Any

GIB_MB = 1024.0


def detected_gpu() -> tuple[str | None, float | None]:
    """(a name ``recommend`` knows the throughput of, memory in GB) of the first CUDA device; (None, None) without."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    properties = torch.cuda.get_device_properties(0)
    from ..choose import recommend as rec

    known = rec.GPU_BF16_FLOPS
    name = next((n for n in known if n in properties.name.lower()), None)
    return name, round(properties.total_memory / 2**30, 1)


def plan(model: str, gpu_memory_gb: float | None, goal: str, gpu_name: str | None = None, batch_size: int = 4,
         max_length: int = 512) -> dict[str, Any]:
    """``recommend``'s result, plus the rows of its table and the hardware line as its report prints them."""
    from ..choose import recommend as rec

    rec.check_request(goal, batch_size, max_length, gpu_name)
    shape = rec.model_shape(model)
    memory_mb = None if gpu_memory_gb is None else gpu_memory_gb * GIB_MB
    result = rec.recommend(shape, goal, memory_mb, batch_size=batch_size, max_length=max_length, gpu_name=gpu_name)
    budget = None if memory_mb is None else memory_mb * 0.9  # recommend's headroom
    result["rows"] = [[r["method"], r["objective"], f"{r['trainable']:,}", f"{r['memory_mb']:,}", r["step_s"],
                       "—" if budget is None else ("yes" if r["memory_mb"] <= budget else "no")]
                      for r in result["estimates"]]
    result["situation"] = rec.SITUATIONS[goal]
    result["report"] = rec.format_report(result, shape, "CPU" if memory_mb is None else
                                         f"GPU with {gpu_memory_gb:g} GB")
    return result


COLUMNS = ["method", "objective", "trainable params", "peak memory MB", "s / step", "fits (90% of memory)"]
