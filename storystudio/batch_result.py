"""The result of a ``batch`` job: scenes in request order, counts and phase timings.

One shape for both producers of a story's result: the worker's batch
(:mod:`storystudio.batch`) and the client's fan-out over several workers
(:mod:`storystudio.backend.fanout`), which promises the same shape. Light on purpose
(no torch): the client imports it.
"""

from __future__ import annotations

from typing import Any

from storystudio.tasks import BatchTask


def assemble(task: BatchTask, results: dict[str, dict[str, Any]], timings: dict[str, float]) -> dict[str, Any]:
    """The job result: scenes in request order, counts, and the phase timings (seconds)."""
    ordered = [results[s.scene_id] for s in task.scenes]  # type: ignore[index]
    failed = sum(1 for r in ordered if "error" in r)
    out = {
        "project_id": task.project_id,
        "scenes": ordered,
        "scenes_ok": len(ordered) - failed,
        "scenes_failed": failed,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    if task.resume:
        out["scenes_reused"] = sum(1 for r in ordered if r.get("reused"))
    deadline = sum(1 for r in ordered if r.get("error", {}).get("code") == "deadline_exceeded")
    if deadline:
        out["scenes_deadline_exceeded"] = deadline
    return out
