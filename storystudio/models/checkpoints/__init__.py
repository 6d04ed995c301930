"""Official checkpoint layouts: synthetic writers (tiny/full) and validators.

``zimage``  — the Z-Image-Turbo diffusers folder.
``wan_s2v`` — the Wan2.2-S2V-14B folder of the official release.
"""

from storystudio.models.checkpoints.common import PROFILES, Problems, Profile

__all__ = ["PROFILES", "Problems", "Profile"]
