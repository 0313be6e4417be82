"""Run under torchrun by tests/test_distributed.py: trains each config given as JSON on the command line, in order,
in one process per rank (one start-up for several runs). Not a test module itself.

A config with ``"_stop_before_step": k`` is interrupted on every rank as optimiser step ``k`` (0-based) begins, as
if the job were killed there; what it left on disk (its checkpoints) is all a later ``--resume`` run gets, since that
run is started in fresh processes. The worker then goes on with the next config.

A config with ``"_measure_state": PATH`` writes, after the first optimiser step, the bytes each rank holds of the
trained parameters, their gradients, the optimiser state and the frozen reference copy (the local shards under FSDP)
to ``PATH.rank<r>.json``, and the names of reference parameters not sharded (FSDP reshards nothing it never runs
backward through unless told to)."""

import json
import sys

import torch


class Stopped(Exception):
    """The simulated kill."""


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def held_state(trainer) -> dict:
    """Measured after ``optimizer.step()``, before ``zero_grad``: gradients and AdamW moments both exist."""
    from torch.distributed.tensor import DTensor

    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    moments = [v for p in params for k, v in trainer.optimizer.state[p].items() if k != "step"]
    reference = dict(trainer.reference_model.named_parameters()) if trainer.reference_model is not None else {}
    return {"rank": trainer.dist.rank, "parameters": local_bytes(params),
            "gradients": local_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": local_bytes(moments), "reference": local_bytes(reference.values()),
            "unsharded_reference": [n for n, p in reference.items() if not isinstance(p, DTensor)]}


def train(tuneforge, overrides: dict) -> None:
    from tuneforge.run.trainer import Trainer

    stop = overrides.pop("_stop_before_step", None)
    measure = overrides.pop("_measure_state", None)
    original = Trainer.optimizer_step

    def optimizer_step(self, batches, step):
        if step == stop:
            raise Stopped
        if measure and step == 0:
            def record(optimizer, args, kwargs):
                with open(f"{measure}.rank{self.dist.rank}.json", "w") as f:
                    json.dump(held_state(self), f)
                hook.remove()

            hook = self.optimizer.register_step_post_hook(record)
        return original(self, batches, step)

    Trainer.optimizer_step = optimizer_step
    try:
        tuneforge.train(tuneforge.load_config(None, overrides))
    except Stopped:
        pass
    finally:
        Trainer.optimizer_step = original


if __name__ == "__main__":
    import tuneforge

    torch.set_num_threads(1)
    for config in json.loads(sys.argv[1]):
        train(tuneforge, config)
