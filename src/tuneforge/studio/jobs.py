"""Commands the studio runs for the browser: ``python -m tuneforge ARGS`` as separate processes, one at a time by
default, the rest queued in order.

A job is a record in the workspace (``.tuneforge-studio/jobs/ID.json``) and its output in ``ID.log``; the process
writes what it writes from the command line (an ordinary run folder for ``train``). Each process leads its own
session, so it outlives the studio: a restarted studio reads the records back, finds a job still running by its pid,
and starts the queued ones when it ends. ``stop`` sends SIGTERM to the job's process group (torchrun's workers too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from ..run.checkpoint import read_run_record, write_text_atomic
from .workspace import Workspace

log = logging.getLogger(__name__)

QUEUED, RUNNING, FINISHED, FAILED, STOPPED = "queued", "running", "finished", "failed", "stopped"
ACTIVE = (QUEUED, RUNNING)


@dataclasses.dataclass
class Job:
    id: str
    args: list[str]  # after ``tuneforge``: ["train", "--model", ...]
    output: str  # the folder (or file) it writes, relative to the workspace
    state: str = QUEUED
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    returncode: int | None = None

    @property
    def command(self) -> str:
        """What a user would type for the same job."""
        return "tuneforge " + shlex.join(self.args)


class Jobs:
    """The queue: ``submit`` records a job, a worker thread starts queued jobs while fewer than ``parallel`` run."""

    def __init__(self, workspace: Workspace, parallel: int = 1, poll_s: float = 0.5,
                 program: list[str] | None = None):
        self.workspace = workspace
        self.program = program or [sys.executable, "-m", "tuneforge"]  # what a job's arguments follow
        self.parallel = parallel
        self.poll_s = poll_s
        self.folder = workspace.studio_dir() / "jobs"
        self.folder.mkdir(exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}  # jobs this studio started (others: by pid)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- records -----------------------------------------------------------------------------------
    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def log_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.log"

    def _save(self, job: Job) -> None:
        write_text_atomic(self._path(job.id), json.dumps(dataclasses.asdict(job), indent=1))

    def get(self, job_id: str) -> Job:
        return Job(**json.loads(self._path(job_id).read_text()))

    def all(self) -> list[Job]:
        """Every job, oldest first (records a kill cut short are skipped)."""
        jobs = []
        for path in self.folder.glob("*.json"):
            try:
                jobs.append(Job(**json.loads(path.read_text())))
            except (json.JSONDecodeError, TypeError):
                continue
        return sorted(jobs, key=lambda job: job.created)

    def tail(self, job_id: str, chars: int = 4000) -> str:
        path = self.log_path(job_id)
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # -- control -----------------------------------------------------------------------------------
    def submit(self, args: list[str], output: str) -> Job:
        job = Job(uuid.uuid4().hex[:12], list(args), output)
        with self._lock:
            self._save(job)
        self.tick()
        return job

    def stop(self, job_id: str) -> Job:
        """A queued job never starts; a running one gets SIGTERM (its run folder keeps its last checkpoint)."""
        with self._lock:
            job = self.get(job_id)
            if job.state == QUEUED:
                job.state, job.ended = STOPPED, time.time()
                self._save(job)
            elif job.state == RUNNING and job.pid and alive(job.pid):
                with contextlib.suppress(ProcessLookupError):  # it ended between the check and the signal
                    os.killpg(job.pid, signal.SIGTERM)  # the job leads its session: pgid == pid
                job.state = STOPPED  # kept when the process ends (tick reads the exit then)
                self._save(job)
            return job

    def tick(self) -> None:
        """Note the jobs that ended; start queued jobs while there is room."""
        with self._lock:
            jobs = self.all()
            for job in jobs:
                if job.pid and job.ended is None and job.state in (RUNNING, STOPPED):
                    self._reap(job)
            running = sum(job.state == RUNNING for job in jobs)
            for job in jobs:
                if job.state == QUEUED and running < self.parallel:
                    self._start(job)
                    running += 1

    def _reap(self, job: Job) -> None:
        child = self._children.get(job.id)
        if child is not None:
            code = child.poll()
            if code is None:
                return
            job.returncode = code
            del self._children[job.id]
        elif alive(job.pid):  # started by an earlier studio: it is not our child, its pid tells
            return
        job.ended = time.time()
        if job.state != STOPPED:
            done = job.returncode == 0 if job.returncode is not None else wrote(self.workspace.root / job.output)
            job.state = FINISHED if done else FAILED
        self._save(job)

    def _start(self, job: Job) -> None:
        log_file = open(self.log_path(job.id), "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            child = subprocess.Popen([*self.program, *job.args], cwd=self.workspace.root,
                                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        finally:
            log_file.close()
        self._children[job.id] = child
        job.state, job.pid, job.started = RUNNING, child.pid, time.time()
        self._save(job)
        log.info("started %s (pid %d)", job.command, child.pid)

    # -- the worker --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tuneforge-studio-jobs", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # a broken record must not stop the queue
                log.exception("job queue")

    def close(self, stop_running: bool = False) -> None:
        """Stop the worker; with ``stop_running`` also stop this studio's running jobs (tests, a shutdown that asks)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if stop_running:
            for job_id, child in list(self._children.items()):
                self.stop(job_id)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
            self.tick()


def alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live tuneforge process (a reused pid running something else is not)."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    try:
        os.kill(pid, 0)
        if not proc.is_dir():  # no /proc (not Linux): the pid exists, take it for ours
            return True
        cmdline = (proc / "cmdline").read_bytes()
        state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
        return False
    if state == "Z":  # exited, not yet waited for
        return False
    # Empty while the process is inside exec (its new arguments are not set up yet): a job just started.
    return not cmdline or b"tuneforge" in cmdline


def wrote(output: Path) -> bool:
    """Whether a job that an earlier studio started (its exit status unknown here) did its work: a run folder that
    finished, or the file / folder an export writes."""
    record = read_run_record(output)
    return bool(record.get("finished")) if record is not None else output.exists()
