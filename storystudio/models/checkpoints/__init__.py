"""Official checkpoint layouts: file names, official values, meta-device builders, loaders, validators.

``zimage``  — the Z-Image-Turbo diffusers folder.
``wan_s2v`` — the Wan2.2-S2V-14B folder of the official release.

The synthetic writers of these layouts live in :mod:`storystudio.synthetic`.
"""

from storystudio.models.checkpoints.common import Problems

__all__ = ["Problems"]
