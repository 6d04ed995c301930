"""Synthetic checkpoints in the official layouts, with seeded random weights.

``wan_s2v``   — Wan2.2-S2V-14B; ``zimage`` — Z-Image-Turbo; ``torch_zip`` — the streaming
``torch.save`` zip writer both use. Profile ``tiny`` runs the production code on a CPU in
seconds (tests, demo); ``full`` has the real architectures' sizes (GPU benches).

Used by the demo, the tests and ``bench/`` only: the worker (``handler.py``) never imports
this package (``tests/test_structure.py`` checks it).
"""

from typing import Literal

Profile = Literal["tiny", "full"]
PROFILES: tuple[str, ...] = ("tiny", "full")
