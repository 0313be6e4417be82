"""What a run trains and evaluates on: the user's files, a mix of sources, a stream, or the bundled demo; and the
order training reads them in (:class:`EpochSampler`, or a stream's own position)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..data.formats import Example, load_examples
from ..data.mixing import LoadedData, load_mixed, parse_sources
from ..data.streaming import RecordStream, StreamSampler
from ..errors import TuneforgeError
from .distributed import launched_by_torchrun

ASSETS = Path(__file__).parents[1] / "assets"
DEMO_DIR = ASSETS / "demo"


def training_examples(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Train and eval examples: the user's files, a split of them, or the bundled demonstration task."""
    data = training_data(config)
    return data.train, data.eval


def training_data(config: RunConfig) -> LoadedData:
    """The examples and, for a mix of sources, what each source gave (see ``data/mixing.py``)."""
    if config.data in (None, "demo"):  # the bundled demonstration task, its own held-out split for eval
        eval_path = config.eval_data or str(DEMO_DIR / "eval.jsonl")
        return LoadedData(load_examples(DEMO_DIR / "train.jsonl", config.data_format),
                          load_examples(eval_path, config.data_format))
    if config.streaming:
        return streamed_data(config)
    data = load_mixed(config.data, config.data_format, config.seed, 0.0 if config.eval_data else config.eval_split)
    if config.eval_data:
        data.eval = load_examples(config.eval_data, config.data_format)
    return data


STREAMING_IN_ONE_PROCESS = ("--streaming runs in one process: each rank would need its own disjoint part of the "
                            "stream (not supported yet); train without torchrun, or without --streaming")


def streamed_data(config: RunConfig) -> LoadedData:
    """``--streaming``: the training records as a stream (see ``data/streaming.py``); eval data, small, in memory."""
    if launched_by_torchrun():
        raise TuneforgeError(STREAMING_IN_ONE_PROCESS)
    stream = RecordStream(parse_sources(config.data), config.data_format, config.seed, config.shuffle_buffer)
    eval_ = load_examples(config.eval_data, config.data_format) if config.eval_data else []
    return LoadedData([], eval_, stream=stream)


class EpochSampler:
    """Deterministic shuffled order per epoch, with a position that checkpoints can save and restore."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()

    def progress(self) -> dict[str, float]:
        return {"epoch": round(self.epoch + self.index / self.n, 3)}


Sampler = EpochSampler | StreamSampler  # where training items come from: memory (by index) or a stream
