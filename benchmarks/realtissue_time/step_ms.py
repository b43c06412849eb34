"""CPU milliseconds per training step of chapter 07's recipe, split into its parts.

One process, one torch thread (as each of the chapter's two training processes), the real
tile store of the chapter (``tiles/rt`` of a run folder made by the chapter or by
profile_ch07.py), batch 8 x 128 px crops, small encoder. The parts of
:func:`stlib.train.loop._step` are timed one by one (``time.process_time``), synchronously:

    PYTHONPATH=. nice -n 10 python benchmarks/realtissue_time/step_ms.py \
        --run-dir /tmp/ch07-work/runs/realtissue --steps 40 --ab
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--store", default="tiles/rt")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ab", action="store_true", help="also TrainConfig.channels_last_cpu, steps interleaved")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(a.threads)
    from stlib.model.losses import hovernet_loss
    from stlib.realtissue import RecipeConfig
    from stlib.train import TrainConfig
    from stlib.train.augment import augment_batch, draw_augment_params
    from stlib.train.data import hv_from_inst, to_device, training_data
    from stlib.train.loop import _Run, _use_cl, autocast

    r = RecipeConfig()
    device = torch.device("cpu")
    from stlib.train.loop import DistInfo

    variants = {}
    for name, extra in (("default layout", {}), ("channels_last_cpu", {"channels_last_cpu": True})):
        if name != "default layout" and not a.ab:
            continue
        cfg = TrainConfig(recipe="st", run_dir=a.run_dir, stores=(a.store,), out_dir="/tmp/unused-step-ms",
                          train_splits=("train", "val"), val_splits=("val",), val_max_tiles=4, encoder=r.encoder,
                          steps=r.steps, batch_size=r.batch_size, crop_px=r.crop_px, lr=r.lr, aug_hed=r.aug_hed,
                          aug_scale=r.aug_scale, seed=0, device="cpu", val_every=r.steps, warmup_steps=r.warmup_steps,
                          num_workers=0, **extra)
        data, train_idx, val_idx, weights = training_data(cfg)
        run = _Run.build(cfg, device, DistInfo(), weights, None, Path(cfg.out_dir))
        run.model.train()
        variants[name] = (cfg, data, train_idx, run)
    parts = ["read", "to_device", "augment", "hv_targets", "forward", "loss", "backward", "optimizer"]
    acc = {v: {k: 0.0 for k in parts} for v in variants}
    tot = {v: [0.0, 0.0] for v in variants}
    pc = time.process_time
    n_timed = 0
    for i in range(a.warmup + a.steps):
        for v, (cfg, data, train_idx, run) in variants.items():  # interleaved: the same load for each variant
            w0 = time.perf_counter()
            t = [pc()]
            b = data.get(train_idx[run.sampler.draw(cfg.batch_size)])
            t.append(pc())
            tb = to_device(b, device, None)
            t.append(pc())
            tb = augment_batch(tb, draw_augment_params(run.aug_gen, cfg.batch_size, cfg))
            t.append(pc())
            tb["hv"] = hv_from_inst(tb["inst"])
            t.append(pc())
            x = tb["image"].contiguous(memory_format=torch.channels_last) if _use_cl(cfg, device) else tb["image"]
            with autocast(device, cfg.amp):
                out = run.fwd(x)
            t.append(pc())
            loss, _ = hovernet_loss(out, inst=tb["inst"], hv=tb["hv"], type_map=tb["type"], ignore=tb["ignore"],
                                    conf=tb["conf"], weights=cfg.loss)
            t.append(pc())
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(pc())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.opt.step()
            run.sched.step()
            t.append(pc())
            if i >= a.warmup:
                for k, t0, t1 in zip(parts, t[:-1], t[1:]):
                    acc[v][k] += t1 - t0
                tot[v][0] += t[-1] - t[0]
                tot[v][1] += time.perf_counter() - w0
        n_timed += i >= a.warmup
    res = {"command": "python benchmarks/realtissue_time/step_ms.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "torch_threads": torch.get_num_threads(), "batch": r.batch_size, "crop_px": r.crop_px,
           "encoder": r.encoder, "steps_timed": n_timed, "loadavg_after": os.getloadavg(),
           "cpu_ms_per_step": {v: round(1000 * c / n_timed, 1) for v, (c, _) in tot.items()},
           "wall_ms_per_step": {v: round(1000 * w / n_timed, 1) for v, (_, w) in tot.items()},
           "parts_cpu_ms": {v: {k: round(1000 * x / n_timed, 1) for k, x in p.items()} for v, p in acc.items()}}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
