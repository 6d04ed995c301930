"""A story as the client holds it: the job input, validated by the worker's own models.

There is one job schema, the worker's (:mod:`storystudio.tasks`, pydantic, unknown
fields rejected). The client runs the same :func:`storystudio.tasks.parse_job_input`
before anything is sent, so an input the worker would refuse is refused here with
the same :class:`~storystudio.errors.InvalidInput` message, and no request, upload or
``workersMin`` change happens. ``storystudio.tasks`` imports only pydantic and
``storystudio.errors`` (a test keeps it that way), so the client stays light.

What is sent is the caller's own mapping (their spelling of every field), not a
re-serialisation of the parsed model: the worker applies its own defaults. The
parsed model is kept for what the client needs to know, e.g. the scene ids the worker
will use (``scene-001``... for scenes without one).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storystudio.errors import InvalidInput
from storystudio.tasks import BatchTask, ImageTask, VideoTask, parse_job_input

from .errors import ConfigError

Task = ImageTask | VideoTask | BatchTask


@dataclass(frozen=True)
class Story:
    """A validated job input plus the folder its relative media paths are relative to.

    ``job_input`` is a deep copy of what the caller gave (with ``task`` defaulting to
    ``batch``); ``task`` is the worker's parsed model of it.
    """

    job_input: dict[str, Any]
    task: Task
    base_dir: Path

    @property
    def is_batch(self) -> bool:
        return isinstance(self.task, BatchTask)

    @property
    def project_id(self) -> str:
        return self.task.project_id if isinstance(self.task, BatchTask) else f"{self.task.task}-job"

    @property
    def scene_ids(self) -> list[str]:
        """The ids the worker will report scenes under, in order (batch only)."""
        if not isinstance(self.task, BatchTask):
            return []
        return [str(s.scene_id) for s in self.task.scenes]

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: Path | str | None = None, batch_only: bool = True) -> Story:
        """Validate ``data``: the job input itself or a whole job body ``{"input": {...}}``.

        Raises :class:`InvalidInput` with the worker's message when the worker would
        refuse it. ``batch_only``: a story must be a ``batch`` job (``task`` may be left
        out); ``False`` also accepts single ``image``/``video`` jobs.
        """
        if isinstance(data, Mapping) and set(data) == {"input"}:
            data = data["input"]
        if not isinstance(data, Mapping):
            raise InvalidInput("a story must be a JSON object (the batch job's input)")
        job_input = copy.deepcopy(dict(data))
        job_input.setdefault("task", "batch")
        if batch_only and job_input["task"] != "batch":
            raise InvalidInput(f"a story is a 'batch' job; got task {job_input['task']!r}")
        task = parse_job_input(job_input)
        return cls(job_input, task, Path(base_dir) if base_dir is not None else Path.cwd())

    @classmethod
    def from_file(cls, path: str | Path, *, batch_only: bool = True) -> Story:
        """Read a story JSON file (``-``: standard input). Relative media paths in it are
        relative to the file's folder (to the current folder for stdin)."""
        if str(path) == "-":
            text, base = sys.stdin.read(), Path.cwd()
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read story file {path}: {exc.strerror or exc}") from None
            base = Path(path).resolve().parent
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"story file {path} is not valid JSON: {exc}") from None
        return cls.from_mapping(data, base_dir=base, batch_only=batch_only)

    @classmethod
    def load(cls, story: Story | Mapping[str, Any] | str | Path, *, base_dir: Path | str | None = None,
             batch_only: bool = True) -> Story:
        """A :class:`Story` from a Story, a mapping, or a path to a JSON file."""
        if isinstance(story, Story):
            return story
        if isinstance(story, (str, Path)):
            return cls.from_file(story, batch_only=batch_only)
        return cls.from_mapping(story, base_dir=base_dir, batch_only=batch_only)

    def with_input(self, job_input: dict[str, Any]) -> Story:
        """The same story with ``job_input`` replaced (e.g. local paths swapped for URLs),
        validated again: what is finally sent passes the worker's schema too."""
        return Story(job_input, parse_job_input(job_input), self.base_dir)
