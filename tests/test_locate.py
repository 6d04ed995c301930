"""Finding the models where RunPod, a Hugging Face cache or an operator put them.

Each layout is built from the session's tiny checkpoints; cache snapshots hold
relative symlinks into ``blobs/`` exactly as huggingface_hub writes them, and the
engines load through them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest

from storystudio.errors import CheckpointError
from storystudio.models.locate import WAN, ZIMAGE, ModelSearch, hf_cache_dir, locate


def hub_cache(cache: Path, repo_id: str, source: Path, rev: str = "0" * 40, *, ref: bool = True) -> Path:
    """``source`` as the snapshot ``rev`` of ``repo_id`` in a hub cache: blobs + relative symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(rev)
    return snap


def search(tmp_path: Path, **kw) -> ModelSearch:
    return ModelSearch(models_dir=kw.get("models_dir", tmp_path / "flat"),
                       runpod_cache=kw.get("runpod_cache", tmp_path / "runpod-volume/huggingface-cache/hub"),
                       hf_cache=kw.get("hf_cache", tmp_path / "hf/hub"))


def test_runpod_cached_models_are_found_and_load_through_the_symlinks(tiny_models, tmp_path):
    from storystudio.models.image_generator import ImageRequest, ZImageGenerator

    s = search(tmp_path)
    zsnap = hub_cache(s.runpod_cache, "Tongyi-MAI/Z-Image-Turbo", tiny_models[0])
    wsnap = hub_cache(s.runpod_cache, "Wan-AI/Wan2.2-S2V-14B", tiny_models[1], rev="1" * 40)
    assert (zsnap / "transformer" / "config.json").is_symlink()
    assert locate(ZIMAGE, None, s).path == zsnap and locate(ZIMAGE, None, s).kind == "runpod-cache"
    assert locate(WAN, None, s).path == wsnap
    img = ZImageGenerator.from_pretrained(zsnap).generate(ImageRequest(prompt="x", width=256, height=256, steps=1, seed=1))
    ref = ZImageGenerator.from_pretrained(tiny_models[0]).generate(ImageRequest(prompt="x", width=256, height=256,
                                                                                 steps=1, seed=1))
    assert img.image.tobytes() == ref.image.tobytes()


def test_hf_cache_from_hf_home_and_the_snapshot_refs_main_names(tiny_models, tmp_path):
    assert hf_cache_dir({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hf_cache_dir({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"}) == Path("/c")
    s = search(tmp_path, hf_cache=hf_cache_dir({"HF_HOME": str(tmp_path / "home")}))
    old = hub_cache(s.hf_cache, "Tongyi-MAI/Z-Image-Turbo", tiny_models[0], rev="a" * 40)
    new = hub_cache(s.hf_cache, "Tongyi-MAI/Z-Image-Turbo", tiny_models[0], rev="b" * 40, ref=False)
    os.utime(new, (2e9, 2e9))
    found = locate(ZIMAGE, None, s)
    assert found.path == old and found.kind == "hf-cache", "refs/main wins over a newer snapshot"
    (s.hf_cache / "models--Tongyi-MAI--Z-Image-Turbo" / "refs" / "main").unlink()
    assert locate(ZIMAGE, None, s).path == new, "without refs/main the newest snapshot is used"


def test_the_flat_folder_comes_first_and_a_broken_one_falls_through_to_the_cache(tiny_models, tmp_path, caplog):
    s = search(tmp_path)
    shutil.copytree(tiny_models[1], s.models_dir / "Wan2.2-S2V-14B")
    snap = hub_cache(s.runpod_cache, "Wan-AI/Wan2.2-S2V-14B", tiny_models[1])
    assert locate(WAN, None, s).kind == "flat"
    (s.models_dir / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth").unlink()  # a half-copied volume
    with caplog.at_level(logging.WARNING):
        found = locate(WAN, None, s)
    assert found.path == snap and found.kind == "runpod-cache"
    assert any("Wan2.1_VAE.pth" in r.getMessage() for r in caplog.records)


def test_an_explicit_folder_is_the_only_candidate(tiny_models, tmp_path):
    s = search(tmp_path)
    hub_cache(s.runpod_cache, "Wan-AI/Wan2.2-S2V-14B", tiny_models[1])
    with pytest.raises(CheckpointError) as ei:
        locate(WAN, tmp_path / "mine", s)
    assert ei.value.code == "checkpoint_missing" and str(tmp_path / "mine") in ei.value.message
    assert "runpod-cache" not in ei.value.message
    assert locate(WAN, tiny_models[1], s).kind == "explicit"


def test_nothing_found_lists_every_place_tried(tiny_models, tmp_path):
    s = search(tmp_path)
    broken = s.models_dir / "Z-Image-Turbo"
    shutil.copytree(tiny_models[0], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError) as ei:
        locate(ZIMAGE, None, s)
    msg = ei.value.message
    assert msg.startswith("Tongyi-MAI/Z-Image-Turbo not found; tried: flat: ")
    assert "vae/config.json" in msg and "runpod-cache: no " in msg and "hf-cache: no " in msg
    assert str(s.runpod_cache / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots") in msg
    assert ei.value.code == "checkpoint_missing", "the damaged flat copy is missing files"
