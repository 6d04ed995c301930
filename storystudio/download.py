"""Download the official model weights into the folder layout the worker reads.

``storystudio-download`` fetches the two official Hugging Face repositories with
``huggingface_hub.snapshot_download`` into ``<models>/Z-Image-Turbo`` and
``<models>/Wan2.2-S2V-14B`` (``<models>`` = ``--models-dir``, else
``STORYSTUDIO_MODELS_DIR``, else ``/runpod-volume/models``), then checks every
folder with the checkpoint validators the worker itself runs at start-up, so a
half-copied volume is caught here and not at the first cold start.

Only the files the worker loads are fetched (``allow_patterns`` below: no README
assets, no duplicate ``pytorch_model.bin`` / flax / language-model files). Re-running
is cheap and resumes an interrupted download: files already complete in the
folder are skipped by ``huggingface_hub``. ``HF_TOKEN`` is passed on when set; the
token is never printed.

Without ``--models-dir``, ``STORYSTUDIO_ZIMAGE_DIR`` / ``STORYSTUDIO_WAN_DIR`` are
honoured exactly as the worker resolves them (:meth:`storystudio.config.WorkerSettings.from_env`),
so the files land where the worker will look for them.

Exit status: 0 when every selected model is downloaded and valid, 1 when a
download or a validation failed (each failure is printed on stderr), 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from storystudio.errors import CheckpointError
from storystudio.models.locate import DEFAULT_MODELS_DIR

log = logging.getLogger("storystudio.download")


@dataclass(frozen=True)
class ModelSpec:
    """One official repository and where/how it lands in the models folder."""

    key: str  # value of --only
    repo_id: str
    folder: str  # sub-folder of the models dir (the repository name)
    dir_env: str  # per-model override the worker honours
    allow_patterns: tuple[str, ...]
    validator: str  # "module:function", imported lazily
    approx_gb: int  # for the log line only


MODELS: dict[str, ModelSpec] = {
    "zimage": ModelSpec(
        key="zimage",
        repo_id="Tongyi-MAI/Z-Image-Turbo",
        folder="Z-Image-Turbo",
        dir_env="STORYSTUDIO_ZIMAGE_DIR",
        # The diffusers folder: model_index.json + one sub-folder per component
        # (transformer and text_encoder are 3 safetensors shards + index each).
        allow_patterns=(
            "model_index.json",
            "scheduler/*.json",
            "text_encoder/*.json",
            "text_encoder/*.safetensors",
            "tokenizer/*",
            "transformer/*.json",
            "transformer/*.safetensors",
            "vae/*.json",
            "vae/*.safetensors",
        ),
        validator="storystudio.models.checkpoints.zimage:validate_zimage",
        approx_gb=21,
    ),
    "wan": ModelSpec(
        key="wan",
        repo_id="Wan-AI/Wan2.2-S2V-14B",
        folder="Wan2.2-S2V-14B",
        dir_env="STORYSTUDIO_WAN_DIR",
        # What wan/configs/wan_s2v_14B.py and WanS2V load: the DiT (config + 4
        # shards + index), the umt5-xxl encoder and its tokenizer folder, the
        # Wan2.1 VAE and the wav2vec2 folder (its safetensors weights and JSON
        # configs only: the repo also carries pytorch_model.bin, flax weights
        # and a CTC language model the encoder never reads).
        allow_patterns=(
            "config.json",
            "diffusion_pytorch_model*.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "models_t5_umt5-xxl-enc-bf16.pth",
            "Wan2.1_VAE.pth",
            "google/umt5-xxl/*",
            "wav2vec2-large-xlsr-53-english/*.json",
            "wav2vec2-large-xlsr-53-english/model.safetensors",
        ),
        validator="storystudio.models.checkpoints.wan_s2v:validate_wan_s2v",
        approx_gb=46,
    ),
}


def target_dir(spec: ModelSpec, models_dir: Path | None, env: Mapping[str, str]) -> Path:
    """Where ``spec`` goes: an explicit ``--models-dir`` wins over every env var."""
    if models_dir is not None:
        return models_dir / spec.folder
    override = env.get(spec.dir_env, "").strip()
    if override:
        return Path(override)
    return Path(env.get("STORYSTUDIO_MODELS_DIR") or DEFAULT_MODELS_DIR) / spec.folder


def load_validator(spec: ModelSpec) -> Callable[[Path], None]:
    module_name, func_name = spec.validator.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def download(spec: ModelSpec, target: Path, token: str | None) -> None:
    """Fetch the allowed files of ``spec.repo_id`` into ``target`` (resumable)."""
    from huggingface_hub import snapshot_download

    log.info(
        "downloading %s (~%d GB) into %s, files: %s",
        spec.repo_id,
        spec.approx_gb,
        target,
        ", ".join(spec.allow_patterns),
    )
    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(
        repo_id=spec.repo_id,
        local_dir=target,
        allow_patterns=list(spec.allow_patterns),
        token=token,
    )


def verify(spec: ModelSpec, target: Path) -> None:
    """Run the worker's own validator; raises :class:`CheckpointError` naming every problem."""
    if not target.is_dir():
        raise CheckpointError(f"{spec.repo_id}: folder {target} does not exist", code="checkpoint_missing")
    load_validator(spec)(target)
    log.info("%s at %s is complete and valid", spec.repo_id, target)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storystudio-download",
        description="Download Z-Image-Turbo and Wan2.2-S2V-14B into the worker's models folder and verify them.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="models folder (default: $STORYSTUDIO_MODELS_DIR or /runpod-volume/models; "
        "without it $STORYSTUDIO_ZIMAGE_DIR / $STORYSTUDIO_WAN_DIR are honoured)",
    )
    parser.add_argument("--only", choices=sorted(MODELS), help="fetch one model instead of both")
    parser.add_argument(
        "--verify-only", action="store_true", help="do not download, only validate what is already there"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verify_only and _truthy(env.get("HF_HUB_OFFLINE")):
        print(
            "storystudio-download: HF_HUB_OFFLINE is set (the worker image sets it), so nothing can be "
            "downloaded; run it with HF_HUB_OFFLINE=0, or pass --verify-only",
            file=sys.stderr,
        )
        return 2

    token = env.get("HF_TOKEN", "").strip() or None
    specs = [MODELS[args.only]] if args.only else list(MODELS.values())
    failures: list[str] = []
    for spec in specs:
        target = target_dir(spec, args.models_dir, env)
        if not args.verify_only:
            try:
                download(spec, target, token)
            except Exception as exc:  # network, auth, disk full: report and go on with the next model
                failures.append(f"download of {spec.repo_id} into {target} failed: {type(exc).__name__}: {exc}")
                continue
        try:
            verify(spec, target)
        except CheckpointError as exc:
            failures.append(f"{spec.repo_id} at {target} failed verification [{exc.code}]: {exc.message}")

    if failures:
        for line in failures:
            print(f"storystudio-download: {line}", file=sys.stderr)
        return 1
    print(f"storystudio-download: {', '.join(s.repo_id for s in specs)} ready", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
