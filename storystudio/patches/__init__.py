"""Workarounds for third-party packages, each in one small tested module.

``wan22`` — makes the official Wan2.2 code (``wan22`` wheel, module ``wan``) importable
and runnable without CUDA, flash-attn, torchvision, decord or opencv.
"""
