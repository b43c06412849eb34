"""stlib.evaluate on inputs whose answer is known: ignore masking, segment-and-score with an
oracle network, the classification head on frozen features."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import torch

from stlib import evaluate as ev
from stlib.constants import IGNORE

torch.set_num_threads(1)
T = 64


def _tiles(n: int, seed: int, *, classes=(1, 2, 3, 5)):
    """Tiles of separated discs, each disc's colour set by its class (what a network can see)."""
    rng = np.random.default_rng(seed)
    colour = {1: (70, 20, 140), 2: (20, 20, 40), 3: (210, 120, 190), 5: (170, 90, 20), IGNORE: (100, 50, 100)}
    yy, xx = np.mgrid[:T, :T]
    img = np.full((n, T, T, 3), 235, np.uint8)
    inst = np.zeros((n, T, T), np.int32)
    typ = np.zeros((n, T, T), np.uint8)
    for i in range(n):
        k = 0
        for cy in (12, 32, 52):
            for cx in (12, 32, 52):
                k += 1
                r = rng.uniform(5, 8)
                m = (yy - cy - rng.uniform(-1.5, 1.5)) ** 2 + (xx - cx - rng.uniform(-1.5, 1.5)) ** 2 <= r * r
                c = int(rng.choice(classes))
                inst[i][m], typ[i][m] = k, c
                img[i][m] = np.clip(np.array(colour[c]) + rng.normal(0, 6, (m.sum(), 3)), 0, 255)
    return {"image": img, "inst": inst, "type": typ, "ignore": np.zeros((n, T, T), np.uint8)}


def _meta(n: int, prefix: str = "t") -> pd.DataFrame:
    return pd.DataFrame({"tile_id": [f"{prefix}{i}" for i in range(n)], "sample": [f"s{i % 2}" for i in range(n)],
                         "organ": "Lung"})


# ----------------------------------------------------------------------------- score_tiles

def test_score_tiles_removes_ignored_pixels_from_truth_and_prediction():
    b = _tiles(3, 0)
    ign = np.zeros((3, T, T), np.uint8)
    ign[:, :, :22] = 1  # the left column of nuclei lies in an excluded region
    b["ignore"] = ign
    pred = []
    for i in range(3):
        p = b["inst"][i].copy()
        p[:, :22] = 0  # the network misses every nucleus there...
        p[40:50, 2:12] = 99  # ...and finds one that is not in the truth, also there
        pred.append((p, np.where(p > 0, 2, 0).astype(np.uint8)))
    masked = ev.score_tiles(b, pred, meta=_meta(3), method="m", with_types=False)
    assert len(masked) == 3 and (masked["model"] == "m").all()
    assert np.allclose(masked["pq"], 1.0) and (masked["pq_fp"] == 0).all() and (masked["pq_fn"] == 0).all()
    # the same predictions without the ignore mask: 3 misses and one false positive per tile
    unmasked = ev.score_tiles({k: v for k, v in b.items() if k != "ignore"}, pred, meta=_meta(3), method="m",
                              with_types=False)
    assert (unmasked["pq_fn"] == 3).all() and (unmasked["pq_fp"] == 1).all() and (unmasked["pq"] < 0.8).all()


def test_score_tiles_classes_skip_unknown_truth_but_keep_it_for_segmentation():
    b = _tiles(2, 1, classes=(1, 2, IGNORE))
    pred = [(b["inst"][i], np.where(b["type"][i] == IGNORE, 3, b["type"][i]).astype(np.uint8)) for i in range(2)]
    r = ev.score_tiles(b, pred, meta=_meta(2), method="m")
    assert np.allclose(r["pq"], 1.0)  # segmentation: every nucleus, unknown class included
    assert np.allclose(r["mpq"], 1.0), r["mpq"]  # classes: the unknown ones (predicted 3) count for nothing


# ----------------------------------------------------------------------------- segment_and_score

class Oracle(torch.nn.Module):
    """A network that answers with the ideal maps of the images it was given (or nothing)."""

    def __init__(self, batch: dict, *, empty: bool = False) -> None:
        super().__init__()
        from stlib.bench import ideal_maps  # ideal network outputs from an instance map
        from stlib.model.net import to_input

        self.x = to_input(torch.from_numpy(batch["image"]))
        maps = [ideal_maps(batch["inst"][i], np.arange(256, dtype=np.uint8), 6) for i in range(len(batch["image"]))]
        for i, (_, _, tp) in enumerate(maps):  # classes from the type map, not the instance ids
            tp[:] = 0
            t = batch["type"][i]
            for c in range(6):
                tp[c] = t == c
        self.maps = [tuple(torch.from_numpy(np.asarray(m, np.float32)) for m in mm) for mm in maps]
        self.empty = empty

    def forward(self, x):
        outs = {"np": [], "hv": [], "nt": []}
        for xi in x:
            j = next(j for j in range(len(self.x)) if torch.equal(self.x[j], xi))
            p, hv, tp = self.maps[j]
            if self.empty:
                p = torch.zeros_like(p)
            outs["np"].append(torch.stack([-20 * (p - 0.5), 20 * (p - 0.5)]))
            outs["hv"].append(hv)
            outs["nt"].append(20 * tp)
        return {k: torch.stack(v) for k, v in outs.items()}


def _segment_and_score(models: dict, batch: dict, meta: pd.DataFrame) -> pd.DataFrame:
    """segment_and_score through whichever signature this version has (one reference set)."""
    params = inspect.signature(ev.segment_and_score).parameters
    if "references" in params:  # models per seed, reference sets
        ref = ev.ReferenceSet("truth", "manual", "post-Xenium H&E", "imgs", batch,
                              meta.rename(columns={"tile_id": "image", "sample": "slide"}))
        return ev.segment_and_score({k: {0: m} for k, m in models.items()}, [ref], device="cpu")[0]
    return ev.segment_and_score(models, batch, meta, device="cpu")[0]


def test_segment_and_score_with_an_oracle_and_an_empty_network():
    b = _tiles(4, 2)
    per = _segment_and_score({"oracle": Oracle(b), "empty": Oracle(b, empty=True)}, b, _meta(4))
    assert len(per) == 8 and set(per["model"]) == {"oracle", "empty"}
    o, e = per[per["model"] == "oracle"], per[per["model"] == "empty"]
    assert (o["pq"] >= 0.98).all() and (o["mpq"] >= 0.98).all(), o[["pq", "mpq"]]
    assert (e["pq"] == 0).all() and (e["n_pred"] == 0).all()
    assert list(o["image"]) == [f"t{i}" for i in range(4)]


# ----------------------------------------------------------------------------- classification head

def test_classification_head_learns_the_label_set_it_is_given():
    from stlib.model.net import build_model

    torch.manual_seed(0)
    model = build_model({"encoder": "small"})  # frozen random features: they still see colour
    train, test = _tiles(8, 3), _tiles(4, 4)
    right = train["type"]
    # the same nuclei labelled with the next class: a consistent but wrong label set
    wrong = np.where(right > 0, np.select([right == 1, right == 2, right == 3, right == 5], [2, 3, 5, 1]), 0)
    rng = np.random.default_rng(0)
    shuffled = right.copy()  # classes drawn at random per nucleus: no information
    for i in range(len(shuffled)):
        for k in np.unique(train["inst"][i])[1:]:
            shuffled[i][train["inst"][i] == k] = rng.choice([1, 2, 3, 5])
    scores, per_image = ev.classification_head_eval(
        model, train, {"right": right, "wrong": wrong.astype(np.uint8), "random": shuffled}, test, _meta(4, "u"),
        device="cpu")
    s = scores.set_index("labels")
    assert s.loc["right", "accuracy"] >= 0.8, s  # measured 0.86-0.97 over network seeds
    assert s.loc["wrong", "accuracy"] <= 0.2, s
    assert s.loc["random", "accuracy"] < s.loc["right", "accuracy"] - 0.3, s
    assert s.loc["right", "n_train_nuclei"] == 8 * 9 and s.loc["right", "n_test_nuclei"] == 4 * 9
    assert len(per_image) == 3 * 4 and set(per_image["labels"]) == {"right", "wrong", "random"}
