"""ModelManager swaps alone, on synthetic model sets of the real component sizes.

No checkpoints, no engines: two sets of bf16 parameter blocks shaped like the real
components (Wan: DiT 30.35 GiB, T5 10.58, VAE 0.47, wav2vec2 1.18; Z-Image: transformer
11.46, text encoder 7.49, VAE 0.16), so the manager's own path is measured. The
synthetic engines hold real tensors, so the manager adopts them: their parking buffers
are made and pinned while the sets load (the first ``ensure``), and round 1 swaps like
the others.

GPU only: ``python bench/bench_swap.py [--budget-gib 44] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.models.model_manager import GiB, ModelManager  # noqa: E402

WAN = {"transformer": 30.35, "text_encoder": 10.58, "vae": 0.47, "audio_encoder": 1.18}
ZIMAGE = {"transformer": 11.46, "text_encoder": 7.49, "vae": 0.16}
BLOCK = 256 * 1024**2  # bytes per parameter tensor, like a large layer


class Synthetic:
    def __init__(self, sizes_gib: dict[str, float], device: torch.device) -> None:
        self.mods: dict[str, nn.Module] = {}
        for name, gib in sizes_gib.items():
            n = int(gib * GiB)
            m = nn.Module()
            for i in range(max(1, n // BLOCK)):
                m.register_parameter(f"w{i}", nn.Parameter(torch.empty(BLOCK // 2, dtype=torch.bfloat16, device=device),
                                                           requires_grad=False))
            self.mods[name] = m

    def components(self) -> dict[str, nn.Module]:
        return self.mods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget-gib", type=float, default=44.0, help="forces near-full swaps (one set fits)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = torch.device("cuda")
    mgr = ModelManager(dev, budget_gib=args.budget_gib)
    mgr.register("video", lambda d: Synthetic(WAN, d))
    mgr.register("image", lambda d: Synthetic(ZIMAGE, d), size_hint_bytes=int(sum(ZIMAGE.values()) * GiB))
    res: dict = {"budget_gib": args.budget_gib, "gpu": torch.cuda.get_device_name(dev), "rounds": []}
    mgr.ensure("video")
    for r in range(args.rounds):
        row = {}
        for name in ("image", "video"):
            s0, t0 = mgr.stats().swap_seconds, time.perf_counter()
            mgr.ensure(name)
            torch.cuda.synchronize()
            row[f"to_{name}_copy_s"] = round(mgr.stats().swap_seconds - s0, 3)
            row[f"to_{name}_wall_s"] = round(time.perf_counter() - t0, 3)
        res["rounds"].append(row)
        print(f"| round {r + 1} | " + " | ".join(f"{k} {v}" for k, v in row.items()) + " |", flush=True)
    res["stats"] = mgr.stats().as_dict()
    res["residency"] = mgr.component_residency()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_swap.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["stats"]))


if __name__ == "__main__":
    main()
