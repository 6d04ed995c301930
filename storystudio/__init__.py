"""Story Studio worker: Z-Image-Turbo images and Wan2.2-S2V talking videos on one GPU."""

__version__ = "0.1.0"
