"""``storystudio serve``: the worker as a self-hosted HTTP service (FastAPI + uvicorn).

Before RunPod, the story app talked to a self-hosted REST service; its clients still
exist, and people who run their own GPU box need the worker without RunPod. This
package puts the same :class:`~storystudio.worker.Worker` (one ModelManager, one
model set in VRAM) behind that earlier API and behind ``POST /jobs``, which takes the
RunPod job input unchanged. Every request becomes one worker job; there is one job
schema (:func:`storystudio.tasks.parse_job_input`), the earlier API's endpoints only
translate their fields into it.

Modules, one job each:

``settings``  environment and command-line configuration (:class:`ServeSettings`)
``auth``      ``X-API-Key`` checking (constant time) and the loopback-only rule
``uploads``   request body and upload size limits, derived from the worker's input limits
``paths``     confinement of ``image_path``/``audio_path`` and of ``/videos`` to their folders
``store``     the SQLite job table (status, input hashes, result, times)
``queue``     the one FIFO GPU thread that runs jobs on the worker
``context``   what the endpoints share; ``submit``: the one way a request becomes a job
``errors``    worker error codes -> HTTP status codes, ``{"detail": ...}`` bodies
``legacy``    the earlier API: ``/generate-video``, ``/status``, ``/generate/speech-to-video``, ``/videos``
``app``       the FastAPI app factory: ``/``, ``/health``, ``/models``, ``/jobs`` plus the above
``cli``       ``storystudio-serve`` / ``storystudio serve``: checks, then uvicorn
"""
