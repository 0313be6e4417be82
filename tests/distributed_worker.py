"""Run under torchrun by tests/test_distributed.py: trains each config given as JSON on the command line, in order,
in one process per rank (one start-up for several runs). Not a test module itself.

A config with ``"_stop_before_step": k`` is interrupted on every rank as optimiser step ``k`` (0-based) begins, as
if the job were killed there; what it left on disk (its checkpoints) is all a later ``--resume`` run gets, since that
run is started in fresh processes. The worker then goes on with the next config."""

import json
import sys

import torch


class Stopped(Exception):
    """The simulated kill."""


def train(tuneforge, overrides: dict) -> None:
    from tuneforge.trainer import Trainer

    stop = overrides.pop("_stop_before_step", None)
    original = Trainer.optimizer_step

    def optimizer_step(self, batches, step):
        if step == stop:
            raise Stopped
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
