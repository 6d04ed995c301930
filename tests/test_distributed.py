"""Multi-GPU worker on CPU: gloo ranks on the tiny checkpoints.

* the sequence-parallel DiT forward (and the cfg split) equals the official 1-rank forward;
* a job on a 2-rank pool gives the same video as the single-process Worker;
* a rank killed mid-job fails that job with ``rank_failed``; the pool restarts and the next
  job succeeds; a rank killed between jobs is replaced without failing anything;
* the worker picks the pool only when configured for more than one rank.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.config import WorkerSettings
from storystudio.distributed.config import DistributedConfig
from storystudio.distributed.executor import DistributedExecutor, _free_port
from storystudio.distributed.launch import build_job_handler
from storystudio.errors import InvalidInput
from storystudio.media import decode_video_frames, encode_audio, encode_png, synth_speech
from storystudio.storage import StorageSettings
from storystudio.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def _settings(tiny_models, out: Path) -> WorkerSettings:
    zdir, wdir = tiny_models
    return replace(WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}), zimage_dir=zdir, wan_dir=wdir,
                   storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(out)}))


def _video_job(job_id: str, *, seconds: float = 0.75, steps: int = 2, seed: int = 5) -> dict:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8))
    audio = encode_audio(synth_speech(seconds, seed=1), "wav")
    return {"id": job_id, "input": {
        "task": "video", "image": base64.b64encode(encode_png(image)).decode(),
        "audio": "data:audio/wav;base64," + base64.b64encode(audio).decode(),
        "prompt": "a person talking", "max_area": 64 * 64, "steps": steps, "infer_frames": 16, "seed": seed}}


def _frames(result: dict) -> np.ndarray:
    assert "error" not in result, result
    return decode_video_frames(Path(result["video_url"]).read_bytes(), fps=16).astype(np.int16)


# ------------------------------------------------------------------ the forward itself


def _capture_calls(wan_dir: Path) -> list[dict]:
    """The DiT calls of a real 1-step generation (cond, uncond) on the tiny checkpoint.

    CFG batching is off here so the two branches arrive as two calls; the test builds the
    batched call (what the exact path sends) from them.
    """
    from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
    from storystudio.models.video_path import VideoPathOptions

    engine = WanS2VGenerator.from_pretrained(wan_dir, device="cpu", options=VideoPathOptions(cfg_batch="off"))
    calls: list[dict] = []
    official = engine.transformer.forward

    def record(x, **kwargs):
        calls.append({"x": x, **kwargs})
        return official(x, **kwargs)

    engine.transformer.forward = record
    rng = np.random.RandomState(0)
    engine.generate(VideoRequest(image=Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8)),
                                 audio=(rng.randn(12000) * 0.1).astype(np.float32), prompt="hi",
                                 max_area=64 * 64, steps=1, seed=3, infer_frames=16))
    return calls


def _engine_request():
    from storystudio.models.video_generator import VideoRequest

    rng = np.random.RandomState(2)
    return VideoRequest(image=Image.fromarray((rng.rand(80, 96, 3) * 255).astype(np.uint8)),
                        audio=(rng.randn(24000) * 0.1).astype(np.float32), prompt="a talk",
                        max_area=64 * 64, steps=2, seed=11, infer_frames=16)


def _sp_rank(rank: int, size: int, init_method: str, wan_dir: str, calls_path: str, inboxes, results) -> None:
    """One gloo rank: parallel forwards of the captured calls, compared by rank 0 with the
    official forward; then a whole generation driven by rank 0 (frames before encoding)."""
    from storystudio.distributed.parallel_dit import Comm, Message, ParallelDiT, execute, follow
    from storystudio.distributed.rank import DiTOnly
    from storystudio.models.video_generator import WanS2VGenerator

    torch.set_num_threads(1)
    comm = Comm.init(rank=rank, size=size, device=torch.device("cpu"), init_method=init_method, timeout_s=120)
    model = DiTOnly.load(Path(wan_dir), torch.device("cpu")).transformer
    cond, uncond = torch.load(calls_path, weights_only=False)
    both = dict(cond, x=cond["x"] + uncond["x"], context=cond["context"] + uncond["context"],
                audio_input=torch.cat([cond["audio_input"], uncond["audio_input"]]),
                cond_states=torch.cat([cond["cond_states"]] * 2),
                motion_latents=torch.cat([cond["motion_latents"]] * 2),
                ref_latents=torch.cat([cond["ref_latents"]] * 2))
    from storystudio.models import fused_rope as fused_rope_module
    from storystudio.models.fused_rope import fused_rope

    fused_calls = [0]
    real_rope = fused_rope_module.rope_apply

    def counting_rope(*args, **kwargs):
        fused_calls[0] += 1
        return real_rope(*args, **kwargs)

    fused_rope_module.rope_apply = counting_rope  # the SP attention looks the name up at call time
    with torch.no_grad():
        sp_cond = execute(model, comm, "ulysses", cond)
        sp_uncond = execute(model, comm, "ulysses", uncond)
        cfg = execute(model, comm, "cfg", both)
        with fused_rope(model, torch.device("cpu")):  # the exact path's RoPE, as rank 0's engine announces it
            fused_cfg = execute(model, comm, "cfg", both)
        fused_calls_forward, fused_calls[0] = fused_calls[0], 0
        if rank == 0:
            ref_cond, ref_uncond = model(**cond), model(**uncond)
            results.put({
                "tokens": int(ref_cond[0].numel()),
                "ulysses": max(float((a - b).abs().max()) for a, b in ((sp_cond[0], ref_cond[0]),
                                                                       (sp_uncond[0], ref_uncond[0]))),
                "cfg": max(float((cfg[0] - ref_cond[0]).abs().max()), float((cfg[1] - ref_uncond[0]).abs().max())),
                "cfg_fused_rope": max(float((fused_cfg[0] - ref_cond[0]).abs().max()),
                                      float((fused_cfg[1] - ref_uncond[0]).abs().max())),
                "fused_rope_calls": fused_calls_forward,
                "scale": float(ref_cond[0].abs().mean()),
                "differ": float((ref_cond[0] - ref_uncond[0]).abs().max()),
            })
    if size != 2:
        return
    # The engine end to end: rank 0's Wan engine with the parallel DiT, the others following.
    if rank != 0:
        follow(comm, inboxes[rank - 1], lambda: model)
        results.put({"follower_fused_rope_calls": fused_calls[0]})
        return
    engine = WanS2VGenerator.from_pretrained(Path(wan_dir), device="cpu")
    single = engine.generate(_engine_request()).frames.astype(np.int16)
    ParallelDiT(engine.transformer, comm, inboxes, "ulysses").install()
    parallel = engine.generate(_engine_request()).frames.astype(np.int16)
    for q in inboxes:
        q.put(Message("stop"))
    results.put({"frames_shape": parallel.shape, "frames_max_diff": int(np.abs(parallel - single).max()),
                 "frames_std": float(single.std())})


@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_sp_forward_and_generation_equal_one_rank(tiny_models, tmp_path, ranks):
    calls = _capture_calls(tiny_models[1])
    assert len(calls) == 2, "one step: the conditional and the unconditional forward"
    path = tmp_path / "calls.pt"
    torch.save(calls, path)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(ranks - 1)]
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_sp_rank, args=(r, ranks, init, str(tiny_models[1]), str(path), inboxes, results))
             for r in range(ranks)]
    for p in procs:
        p.start()
    try:
        got = results.get(timeout=300)
        later = [results.get(timeout=300) for _ in range(2 if ranks == 2 else 0)]  # video, follower (any order)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * ranks
    assert got["differ"] > 1e-3, "cond and uncond must differ, or the cfg check proves nothing"
    # float32 on CPU: only the summation order differs from the official forward
    assert got["ulysses"] <= 1e-4 * max(1.0, got["scale"]), got
    assert got["cfg"] <= 1e-4 * max(1.0, got["scale"]), got
    assert got["cfg_fused_rope"] <= 1e-4 * max(1.0, got["scale"]), got
    assert got["fused_rope_calls"] > 0, "the fused RoPE must really run in the SP attention"
    if not later:
        return
    video = next(r for r in later if "frames_shape" in r)
    # Rank 0's engine runs the exact path (fused RoPE): the follower was told and used it too.
    assert next(r for r in later if "follower_fused_rope_calls" in r)["follower_fused_rope_calls"] > 0
    # 1.5 s of audio, 16 frames per clip: two clips, motion frames carried over, 2 steps each
    assert video["frames_shape"] == (24, 64, 64, 3) and video["frames_std"] > 0
    assert video["frames_max_diff"] <= 1, "uint8 frames before encoding: at most a rounding step apart"


def test_distributed_sequence_split_is_balanced_and_uneven_lengths_work():
    from storystudio.distributed.sequence_parallel import SPGroup

    sp = SPGroup(None, 1, 4)
    sizes = sp.split_sizes(10)
    assert sizes == [3, 3, 2, 2] and sum(sizes) == 10
    assert sp.bounds(sizes) == (3, 6) and sp.bounds(sizes, 3) == (8, 10)


def test_distributed_cfg_batch_split_keeps_shared_arguments():
    from storystudio.distributed.parallel_dit import split_cfg_batch

    t = torch.tensor([999.0])
    kwargs = {"x": ["a", "b"], "t": t, "context": ["c", "n"], "audio_input": torch.arange(2.0).view(2, 1),
              "motion_frames": [73, 19], "seq_len": 5, "ref_latents": torch.zeros(2, 3)}
    second = split_cfg_batch(kwargs, 1, 2)
    assert second["x"] == ["b"] and second["context"] == ["n"] and second["t"] is t
    assert second["audio_input"].tolist() == [[1.0]] and second["ref_latents"].shape == (1, 3)
    assert second["motion_frames"] == [73, 19] and second["seq_len"] == 5  # not per sample


# ------------------------------------------------------------------ the pool behind handler.py


@pytest.fixture(scope="module")
def pool(tiny_models, tmp_path_factory):
    events: list[tuple[dict, dict]] = []
    hooks: list = []

    def sink(job, event):
        events.append((job, event))
        for hook in list(hooks):
            hook(job, event)

    ex = DistributedExecutor(_settings(tiny_models, tmp_path_factory.mktemp("pool-out")),
                             DistributedConfig(world_size=2, start_timeout_s=300), sink=sink)
    ex.prewarm()
    ex.events, ex.hooks = events, hooks  # type: ignore[attr-defined]
    yield ex
    ex.close()


def test_distributed_job_gives_the_same_video_as_one_rank(pool, tiny_models, tmp_path):
    job = _video_job("same-1")
    got = pool.handle(job)
    assert "error" not in got, got
    assert got["parallel"]["ranks"] == 2 and got["parallel"]["mode"] == "cfg"
    # steps=2, one clip, guidance > 1: the exact path batches both guidance branches into
    # one forward per step (the cfg mode splits that batch over the two ranks)
    assert got["engine"]["cfg_batched_clips"] == 1, got["engine"]
    assert got["parallel"]["dit_forwards"] == 2
    stages = [e["stage"] for j, e in pool.events if j["id"] == "same-1"]
    assert stages[0] == "inputs" and "video_clips" in stages  # progress crossed the process boundary
    single = Worker.from_settings(_settings(tiny_models, tmp_path / "one")).handle(job)
    a, b = _frames(got), _frames(single)
    assert a.shape == b.shape == (12, 64, 64, 3) and a.std() > 0
    # Decoded H.264: a rounding step in the raw frames (checked exactly in the forward test
    # above) can move a macroblock decision, so compare by PSNR, not pixel by pixel.
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 30, f"2 ranks must render the video 1 rank renders (mse {mse})"


def test_distributed_rank_killed_mid_job_fails_it_with_rank_failed_then_pool_restarts(pool):
    pool.handle(_video_job("warm", steps=1))  # pool up, models loaded
    old = pool.pids
    follower = old[1]

    def kill(job, event):
        if job["id"] == "killed" and event["stage"] == "inputs":
            os.kill(follower, signal.SIGKILL)

    pool.hooks.append(kill)
    try:
        failed = pool.handle(_video_job("killed", steps=1))
    finally:
        pool.hooks.remove(kill)
    assert failed["code"] == "rank_failed", failed
    assert failed["error"].startswith("rank_failed: ") and "rank 1" in failed["error"]
    assert "SIGKILL" in failed["error"], failed["error"]
    assert failed["job_id"] == "killed"
    ok = pool.handle(_video_job("after", steps=1))
    assert "error" not in ok, ok
    assert pool.pids and set(pool.pids).isdisjoint(old), "the whole pool was restarted"


def test_distributed_rank_killed_between_jobs_is_replaced(pool):
    first = pool.handle(_video_job("before-kill", steps=1))
    assert "error" not in first, first
    old = pool.pids
    os.kill(old[1], signal.SIGKILL)
    time.sleep(0.5)
    ok = pool.handle(_video_job("after-kill", steps=1))
    assert "error" not in ok, ok
    assert set(pool.pids).isdisjoint(old)


# ------------------------------------------------------------------ choosing a pool or a Worker


def test_distributed_config_from_env():
    cfg = DistributedConfig.from_env({"STORYSTUDIO_GPUS": "2"}, device="cpu")
    assert cfg.enabled and cfg.world_size == 2 and cfg.mode == "auto"
    assert not DistributedConfig.from_env({}, device="cpu").enabled  # CPU default: one process
    off = DistributedConfig.from_env({"STORYSTUDIO_GPUS": "4", "STORYSTUDIO_DISTRIBUTED": "off"}, device="cpu")
    assert off.world_size == 1
    cfg = DistributedConfig.from_env({"STORYSTUDIO_GPUS": "4", "STORYSTUDIO_PARALLEL_MODE": "ulysses",
                                      "STORYSTUDIO_DIST_JOB_TIMEOUT_S": "900"}, device="cpu")
    assert (cfg.world_size, cfg.mode, cfg.job_timeout_s) == (4, "ulysses", 900.0)
    for env, fragment in (({"STORYSTUDIO_GPUS": "two"}, "not an integer"),
                          ({"STORYSTUDIO_GPUS": "0"}, "GPU(s) are visible"),
                          ({"STORYSTUDIO_GPUS": "3", "STORYSTUDIO_PARALLEL_MODE": "cfg"}, "even number"),
                          ({"STORYSTUDIO_PARALLEL_MODE": "ring"}, "PARALLEL_MODE"),
                          ({"STORYSTUDIO_DISTRIBUTED": "maybe"}, "auto or off")):
        with pytest.raises(InvalidInput) as info:
            DistributedConfig.from_env(env, device="cpu")
        assert info.value.code == "invalid_config" and fragment in info.value.message


def test_distributed_handler_picks_the_pool_only_for_several_ranks(tiny_models, tmp_path):
    settings = _settings(tiny_models, tmp_path)
    assert isinstance(build_job_handler(settings, env={}), Worker)
    assert isinstance(build_job_handler(settings, env={"STORYSTUDIO_GPUS": "1"}), Worker)
    handler = build_job_handler(settings, env={"STORYSTUDIO_GPUS": "2", "STORYSTUDIO_PARALLEL_MODE": "ulysses"})
    assert isinstance(handler, DistributedExecutor) and handler.mode == "ulysses"
    assert handler.pids == [], "nothing is started before prewarm or the first job"


# ------------------------------------------------------------------ the GPU benchmark, on CPU


def test_multigpu_bench_runs_end_to_end_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/bench_multigpu.py", "--device", "cpu", "--profile", "tiny", "--ranks", "2",
         "--frames", "16", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    (path,) = tmp_path.glob("*-cpux2-multigpu.json")
    data = json.loads(path.read_text())
    assert data["gpus"] == 2 and data["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert data["rope"] == "fused"  # what the worker's exact path runs, on every rank
    for res in ("480p", "720p"):
        row = data[res]
        assert row["cfg_step_s_1gpu"] > 0 and row["cfg_step_s_ngpu"] > 0 and row["speedup"] > 0
        assert set(row["peak_vram_gib_per_gpu"]) == {"ulysses", "cfg"}
        assert row["max_abs_diff_ulysses"] < 1e-3 and row["max_abs_diff_cfg"] < 1e-3
    assert "speed-up" in proc.stdout and str(path) in proc.stdout
