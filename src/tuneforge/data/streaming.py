"""Training data larger than memory (``--streaming``): read with Hugging Face ``datasets`` in streaming mode
(``load_dataset(..., streaming=True)``, an ``IterableDataset``), normalised and tokenized a chunk at a time, never
held whole.

* **Order.** Each epoch is datasets' *buffer* shuffle of the stream (``shuffle(seed, buffer_size)``, reseeded per
  epoch by ``set_epoch``): a buffer of ``shuffle_buffer`` records fills, and each record drawn from it at random is
  replaced by the next one read. It is not a global permutation (that needs the whole file): records far apart in
  the file stay roughly in file order. ``shuffle_buffer=1`` keeps the file order.
* **Epochs.** The length is unknown up front, so a streaming run is sized by ``max_steps``; when the stream ends
  the next epoch starts, reshuffled, and epochs are counted.
* **Several sources** interleave by weight (``interleave_datasets``, seeded, ``all_exhausted``: an epoch ends once
  every source has been read whole, a small source repeating meanwhile, as general-data replay does in memory).
  Without weights the sources follow one another.
* **Position.** datasets' own ``state_dict()`` does not hold the shuffle buffer's content (a reload refills the
  buffer from later records: the order after a resume differs from an uninterrupted run's; checked with datasets
  5.2). So a checkpoint stores (epoch, records read in the epoch before the current chunk, items of that chunk
  used); a resume rebuilds the epoch's stream, skips that many records (reading them again, not holding them) and
  re-tokenizes the chunk: the same items, in the same order.
* **Records.** JSONL is streamed as lines (datasets' ``text`` builder) and each line parsed by the in-memory
  reader's own code: the ``json`` builder's arrow reader would infer types (``"2033-08-31"`` becomes a datetime)
  and fill keys a record lacks. Errors name ``file:line`` as a run without ``--streaming`` does; CSV (cells kept
  strings), Parquet and hub records are ``file:record N``, and a bad one is read again with the in-memory reader
  so that its error names the line. A ``.json`` document is one value, read whole: it is refused.
"""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from .formats import (FORMATS, DataError, Example, _looks_like_hub_id, detect_format, normalise, parse_jsonl_line,
                      read_rows)
from .batching import LengthReport
from .mixing import DataSource, relative_weights

log = logging.getLogger(__name__)

# File type -> datasets' packaged builder.
LINES = ("text", {"encoding": "utf-8-sig", "keep_linebreaks": True})  # JSONL: a row per line, as `for line in f`
BUILDERS = {".jsonl": LINES, ".ndjson": LINES, ".parquet": ("parquet", {}), ".csv": ("csv", {})}
RECORD, SOURCE = "__tuneforge_record", "__tuneforge_source"  # added to each row: its number and source
CHUNK_RECORDS = 256  # records normalised and tokenized at a time


def open_source(source: DataSource, index: int):
    """One source as an ``IterableDataset`` whose rows carry their 1-based record number and source index."""
    import datasets

    path = source.file
    p = Path(path)
    if not p.exists() and _looks_like_hub_id(path):
        from ..models.hub import probe_hub

        name, _, split = path.partition(":")
        probe_hub(name, "dataset", "data")
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    else:
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {path}")
        if p.is_dir():
            raise DataError(f"{p} is a directory, not a data file (.jsonl, .json, .csv or .parquet)")
        if p.suffix.lower() not in BUILDERS:
            raise DataError(f"{p}: --streaming reads .jsonl, .csv or .parquet files (a .json document is one value, "
                            f"read whole), not {p.suffix.lower()!r}")
        builder, options = BUILDERS[p.suffix.lower()]
        if builder == "csv":
            options = _csv_options(p)
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True, **options)
    ds = ds.map(lambda row, i: {RECORD: i + 1, SOURCE: index}, with_indices=True)
    return ds.filter(lambda row: row["text"].strip() != "") if is_lines(source) else ds  # numbered: blank lines count


def _csv_options(p: Path) -> dict[str, Any]:
    """Every column a string, an empty cell "" (not NaN): the cells as the csv module reads them in memory."""
    import csv

    from datasets import Features, Value

    with p.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False,
            "encoding": "utf-8-sig"}


def is_lines(source: DataSource) -> bool:
    return Path(source.file).suffix.lower() in (".jsonl", ".ndjson")


class RecordStream:
    """The training records of one or more sources, an epoch at a time, with a position to save and restore."""

    def __init__(self, sources: list[DataSource], data_format: str, seed: int, shuffle_buffer: int):
        if data_format not in FORMATS and data_format != "auto":
            raise DataError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
        self.sources, self.seed = sources, seed
        self.lines = [is_lines(s) for s in sources]
        parts = [open_source(s, i) for i, s in enumerate(sources)]
        self.formats = [data_format if data_format != "auto" else self._detect(part, i) for i, part in
                        enumerate(parts)]
        self.dataset = self._mix(parts)
        if shuffle_buffer > 1:
            self.dataset = self.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.epoch, self.index = 0, 0  # the epoch, and the records of it read so far
        self.read = [0] * len(sources)  # records read from each source over the whole run
        self._rows: Iterator[dict[str, Any]] | None = None

    def _mix(self, parts: list):
        from datasets import concatenate_datasets, interleave_datasets

        if len(parts) == 1:
            return parts[0]
        if self.sources[0].weight is None:
            return concatenate_datasets(parts)
        shares = relative_weights([s.weight for s in self.sources])
        return interleave_datasets(parts, probabilities=shares, seed=self.seed, stopping_strategy="all_exhausted")

    def _detect(self, part, i: int) -> str:
        """The source's format, from its first record (reading only the file's first block)."""
        first = next(self._checked(iter(part)), None)
        if first is None:
            raise DataError(f"{self.sources[i].path}: no records")
        return detect_format(self._fields(first), self._location(first))

    # -- reading -------------------------------------------------------------------------------------
    def read_chunk(self, n: int) -> list[Example]:
        """The next ``n`` records of this epoch, normalised; fewer at its end, none once it has ended."""
        if self._rows is None:
            self._rows = self._epoch_rows()
        rows = list(islice(self._rows, n))
        self.index += len(rows)
        for row in rows:
            self.read[row[SOURCE]] += 1
        return [self._example(row) for row in rows]

    def next_epoch(self) -> None:
        self.seek(self.epoch + 1, 0)

    def seek(self, epoch: int, index: int) -> None:
        """Go to record ``index`` of ``epoch``: rebuild that epoch's shuffled stream and skip the records before."""
        self.epoch, self.index = epoch, index
        self._rows = self._epoch_rows()
        for _ in islice(self._rows, index):
            pass

    def _epoch_rows(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)  # the buffer shuffle's seed for this epoch
        return self._checked(iter(self.dataset))

    def _checked(self, rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # pyarrow, pandas and datasets each raise their own type for an unreadable file
                raise self._read_error(e) from e
            yield row

    def _read_error(self, error: Exception) -> DataError:
        """The error a file datasets cannot parse gets: the in-memory reader's (naming the line), if it finds one."""
        for source in self.sources:
            if Path(source.file).is_file():
                for _ in read_rows(source.file):  # raises the DataError naming the file and line
                    pass
        names = ", ".join(s.path for s in self.sources)
        return DataError(f"{names}: cannot be read as a stream ({type(error).__name__}: {error})")

    # -- records -------------------------------------------------------------------------------------
    def _location(self, row: dict[str, Any]) -> str:
        i, number = row[SOURCE], row[RECORD]
        return f"{self.sources[i].path}:{number}" if self.lines[i] else f"{self.sources[i].path}:record {number}"

    def _fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """The record as the file has it: a JSONL line parsed; else the row without our two columns, nor the
        ``None`` arrow gives a key a record lacks (a missing key and a null mean the same to ``normalise``)."""
        i = row[SOURCE]
        if self.lines[i]:
            return parse_jsonl_line(row["text"], Path(self.sources[i].file), row[RECORD])
        return {k: v for k, v in row.items() if k not in (RECORD, SOURCE) and v is not None}

    def _example(self, row: dict[str, Any]) -> Example:
        i = row[SOURCE]
        try:
            return normalise(self._fields(row), self.formats[i], self._location(row))
        except DataError:
            if not self.lines[i]:  # a JSONL line number is exact: the error is the in-memory reader's already
                self._raise_as_in_memory(i, row[RECORD])
            raise

    def _raise_as_in_memory(self, i: int, record: int) -> None:
        """Normalise record ``record`` of source ``i`` as read by the in-memory reader: its error names the line."""
        path = self.sources[i].file
        if Path(path).is_file():
            for location, raw in islice(read_rows(path), record - 1, record):
                normalise(raw, self.formats[i], location)

    def summary(self) -> list[dict[str, Any]]:
        """Per source: its weight, the records training read from it (repeats counted; a stream's length, and so
        how often a source repeated, is not known) and their share of all records read."""
        total = max(sum(self.read), 1)
        return [{"source": s.path, "weight": s.weight, "records_read": n, "share": round(n / total, 4)}
                for s, n in zip(self.sources, self.read)]


Prepare = Callable[[list[Example]], tuple[list[Any], Any]]  # examples -> (items, the chunk's LengthReport or None)


class StreamSampler:
    """Training items from a ``RecordStream``: ``chunk`` records are tokenized at a time and handed out in stream
    order. The same interface as the trainer's ``EpochSampler``, but ``take`` returns items, not indices."""

    def __init__(self, stream: RecordStream, prepare: Prepare, chunk: int | None = None):
        self.stream, self.prepare, self.chunk = stream, prepare, chunk or CHUNK_RECORDS
        self.items: list[Any] = []  # the current chunk's items
        self.taken = 0  # of them handed out
        self.chunk_start = 0  # records of the epoch before the current chunk
        self.epoch_items = 0  # items this epoch has made so far
        self.lengths = LengthReport()
        stream.seek(0, 0)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def take(self, k: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < k:
            if self.taken == len(self.items):
                self._next_chunk()
            n = min(k - len(out), len(self.items) - self.taken)
            out += self.items[self.taken:self.taken + n]
            self.taken += n
        return out

    def _next_chunk(self) -> None:
        while True:
            self.chunk_start = self.stream.index
            examples = self.stream.read_chunk(self.chunk)
            if not examples:
                if self.stream.index == 0:
                    raise DataError(f"{', '.join(s.path for s in self.stream.sources)}: no records")
                if self.epoch_items == 0:
                    raise DataError(f"no record of the stream fits: {self.lengths}")
                self.stream.next_epoch()
                self.epoch_items = 0
                continue
            self.items, self.taken = self._prepare(examples), 0
            self.epoch_items += len(self.items)
            if self.items:
                return

    def _prepare(self, examples: list[Example]) -> list[Any]:
        items, report = self.prepare(examples)
        too_long = self.lengths.too_long
        self.lengths.add(report, len(examples))
        if self.lengths.too_long > too_long:  # the objective warned about this chunk's; here the running count
            log.info("streaming: %d of %d records so far longer than max_length: %d truncated, %d dropped",
                     self.lengths.too_long, self.lengths.total, self.lengths.truncated, self.lengths.dropped)
        return items

    def progress(self) -> dict[str, Any]:
        """What the step's log line shows: passes completed, records read, the max-length counts so far."""
        return {"epoch": self.stream.epoch, "records": sum(self.stream.read), "dropped": self.lengths.dropped,
                "truncated": self.lengths.truncated}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.stream.epoch, "index": self.chunk_start, "taken": self.taken,
                "epoch_items": self.epoch_items, "read": list(self.stream.read), "lengths": vars(self.lengths).copy()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: re-read and re-tokenize the chunk it was in, skip the items already used."""
        self.stream.seek(state["epoch"], state["index"])
        self.items = self.prepare(self.stream.read_chunk(self.chunk))[0] if state["taken"] else []
        self.chunk_start, self.taken, self.epoch_items = state["index"], state["taken"], state["epoch_items"]
        self.stream.read = list(state["read"])
        self.lengths = LengthReport(**state["lengths"])
