"""Model engines (Z-Image-Turbo, Wan2.2-S2V), their checkpoints and the ModelManager."""
