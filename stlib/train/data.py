"""Training data: tile stores seen as one set of tiles, the balanced sampler, HV targets and the
batch reader.

* :class:`TileData` reads one or more tile stores (:mod:`stlib.io.tiles` format); tiles are
  chosen by the ``split`` column (never by overlapping patches);
* :class:`BalancedSampler` draws training tiles with weights from :func:`tile_weights` (each
  organ the same total weight, tiles rich in rare classes up-weighted) from its own
  ``torch.Generator``; under DDP every rank draws the same global batch and keeps its stride;
* :func:`hv_from_inst` computes HoVer-Net's HV targets from (augmented) instance maps on the device;
* :class:`Batches` reads the drawn batches in step order in a thread pool.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlib.constants import N_TYPES
from stlib.train.config import TrainConfig
from stlib.utils import InputError


def _open_store(path: Path) -> Any:
    if not (path / "store.json").is_file():
        raise InputError("tile store not found (no store.json)", path=path,
                         fix="build it with `stlib tiles build ...` or notebook 02 (or check run_dir / "
                             "stores in the train config)")
    from stlib.io.tiles import TileStore

    return TileStore(path)


class TileData:
    """One or more tile stores seen as a single indexable set of tiles.

    Attributes
    ----------
    meta
        Concatenated ``meta`` with extra columns ``store`` (index into ``paths``) and ``row``.
    tile_px, um_per_px
        From the stores' ``store.json`` (all stores must agree on both).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        import pandas as pd

        self.paths = [Path(p) for p in paths]
        self.stores = [_open_store(p) for p in self.paths]
        infos = [json.loads((p / "store.json").read_text()) for p in self.paths]
        tps = {int(i["tile_px"]) for i in infos}
        ums = {round(float(i["um_per_px"]), 4) for i in infos}
        if len(tps) != 1 or len(ums) != 1:
            raise InputError(f"tile stores disagree on tile_px {sorted(tps)} / um_per_px {sorted(ums)}",
                             path=self.paths[0], fix="build all stores with the same tile size and resolution")
        self.tile_px = tps.pop()
        self.um_per_px = float(infos[0]["um_per_px"])
        metas = []
        for i, s in enumerate(self.stores):
            m = s.meta.reset_index(drop=True).copy()
            for col in ("organ", "split"):
                if col not in m.columns:
                    raise InputError(f"meta.parquet has no {col!r} column", path=self.paths[i])
            m["store"] = i
            m["row"] = np.arange(len(m))
            metas.append(m)
        self.meta = pd.concat(metas, ignore_index=True)
        #: per-image stain normalisation of :meth:`get` (:meth:`fit_stain`); sample -> StainStats
        self.stain_norm = "none"
        self._stain: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def select(self, splits: Sequence[str], organs: Sequence[str] = (), exclude: Sequence[str] = ()) -> np.ndarray:
        """Global indices of tiles in ``splits`` (and ``organs``, minus ``exclude``), sorted."""
        m = self.meta
        keep = m["split"].astype(str).isin(list(splits)).to_numpy()
        if organs:
            keep &= m["organ"].astype(str).isin(list(organs)).to_numpy()
        if exclude:
            keep &= ~m["organ"].astype(str).isin(list(exclude)).to_numpy()
        return np.flatnonzero(keep)

    def fit_stain(self, idx: np.ndarray, mode: str) -> None:
        """Normalise the images :meth:`get` returns with ``mode`` (:mod:`stlib.model.stain`), each
        tile with the stain statistics of its whole sample, fitted on all tiles of that sample
        among ``idx`` (the tiles together stand for the image, as ``stlib infer`` fits on the
        whole image's thumbnail). ``"none"``: images as stored."""
        from stlib.model.stain import check_stain_norm, fit_stain

        self.stain_norm, self._stain = check_stain_norm(mode), {}
        if mode == "none":
            return
        samples = self._samples()
        idx = np.asarray(idx, np.int64)
        for s in np.unique(samples[idx]):
            tiles = idx[samples[idx] == s]
            self._stain[s] = fit_stain(self._raw(tiles)["images"], mode)

    def get(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the tiles ``idx`` (global indices, any order, repeats allowed).

        Keys ``images`` (B,T,T,3) uint8 (stain-normalised per sample after :meth:`fit_stain`),
        ``inst``, ``type``, ``ignore``, ``conf`` (B,T,T).
        """
        out = self._raw(idx)
        if self.stain_norm != "none":
            from stlib.model.stain import apply_stain, fit_stain

            samples = self._samples()[np.asarray(idx, np.int64)]
            imgs = out["images"].copy()
            for i, s in enumerate(samples):
                if s not in self._stain:  # a tile outside the fitted set: its sample fitted on the fly
                    self._stain[s] = fit_stain(imgs[i], self.stain_norm)
                imgs[i] = apply_stain(imgs[i], self._stain[s])
            out["images"] = imgs
        return out

    def _samples(self) -> np.ndarray:
        """The sample of each tile (stores without a ``sample`` column: one per store)."""
        if "sample" in self.meta.columns:
            return self.meta["sample"].astype(str).to_numpy()
        return ("store" + self.meta["store"].astype(str)).to_numpy()

    def _raw(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`get` without stain normalisation."""
        idx = np.asarray(idx, dtype=np.int64)
        st = self.meta["store"].to_numpy()[idx]
        rows = self.meta["row"].to_numpy()[idx]
        parts: dict[str, list] = {}
        order = []
        for s in np.unique(st):
            sel = np.flatnonzero(st == s)
            r = rows[sel]
            uniq, inv = np.unique(r, return_inverse=True)  # sorted reads from the memmap
            b = self.stores[s].get_batch(uniq)
            if "images" not in b:  # stlib.io.tiles.TileStore names the RGB array "image"
                b = {**b, "images": b["image"]}
            for k in ("images", "inst", "type", "ignore", "conf"):
                parts.setdefault(k, []).append(np.asarray(b[k])[inv])
            order.append(sel)
        back = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate(v)[back] for k, v in parts.items()}

    def class_counts(self, idx: np.ndarray, n_types: int = N_TYPES, *, chunk: int = 256) -> np.ndarray:
        """Pixels per class (0..n_types-1) of each tile in ``idx``: ``(len(idx), n_types)``."""
        out = np.zeros((len(idx), n_types), dtype=np.int64)
        for s, path in enumerate(self.paths):
            sel = np.flatnonzero(self.meta["store"].to_numpy()[idx] == s)
            if not len(sel):
                continue
            tmap = np.load(path / "type.npy", mmap_mode="r")
            rows = self.meta["row"].to_numpy()[idx[sel]]
            for a in range(0, len(sel), chunk):
                t = np.asarray(tmap[np.sort(rows[a:a + chunk])])
                order = np.argsort(rows[a:a + chunk], kind="stable")
                flat = t.reshape(len(t), -1).astype(np.int64)
                flat = np.where(flat < n_types, flat, n_types)  # 255 -> overflow bin
                cnt = np.stack([np.bincount(f, minlength=n_types + 1)[:n_types] for f in flat])
                out[sel[a:a + chunk][order]] = cnt
        return out


def tile_weights(organs: Sequence[str], class_counts: np.ndarray | None = None, *,
                 by_organ: bool = True, by_class: bool = True, max_boost: float = 10.0) -> np.ndarray:
    """Sampling weight of each tile, summing to 1.

    Parameters
    ----------
    organs
        Organ of each tile.
    class_counts
        ``(n_tiles, n_types)`` pixels per class (column 0 = background, ignored).
    by_organ
        Every organ gets the same total weight (weight of a tile = 1 / tiles of its organ).
    by_class
        Multiply by a rarity boost: with ``f_c`` the class fractions over all tiles and
        ``p_ic`` the class fractions of tile ``i``, ``boost_i = sum_c p_ic / (K f_c)``
        (``K`` = classes present), so a tile with the average class mix gets 1 and a tile of
        the rarest class the most; clipped to ``[1/max_boost, max_boost]``. Tiles with no
        classified nucleus get 1.
    max_boost
        Clip of the boost.
    """
    organs = np.asarray(organs, dtype=object)
    n = len(organs)
    if n == 0:
        raise InputError("no training tiles", fix="check train_splits / organs in the train config")
    w = np.ones(n, dtype=np.float64)
    if by_organ:
        uniq, inv, cnt = np.unique(organs.astype(str), return_inverse=True, return_counts=True)
        w /= cnt[inv]
    if by_class and class_counts is not None:
        cc = np.asarray(class_counts, dtype=np.float64)[:, 1:]
        tot = cc.sum(axis=0)
        present = tot > 0
        if present.sum() > 1:
            freq = tot / tot.sum()
            inv_f = np.where(present, 1.0 / np.where(present, freq, 1.0), 0.0) / present.sum()
            rows = cc.sum(axis=1)
            frac = cc / np.maximum(rows, 1)[:, None]
            boost = np.where(rows > 0, frac @ inv_f, 1.0)
            w *= np.clip(boost, 1.0 / max_boost, max_boost)
    return w / w.sum()


class BalancedSampler:
    """Weighted sampling with replacement from a private ``torch.Generator``, DDP-sharded.

    Every rank holds the same generator and draws the same global batch; rank ``r`` of
    ``W`` keeps positions ``r, r + W, ...``. The state (generator + draw count) goes into
    checkpoints, so a resumed run draws exactly the same tiles.
    """

    def __init__(self, weights: np.ndarray, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.ndim != 1 or len(w) == 0 or not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError("weights must be a non-empty 1-D array of non-negative numbers with a positive sum")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.weights = w
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self.draws = 0

    def draw(self, global_batch: int) -> np.ndarray:
        """Positions (into ``weights``) of this rank's share of the next global batch."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} not divisible by world size {self.world_size}")
        idx = torch.multinomial(self.weights, global_batch, replacement=True, generator=self.generator)
        self.draws += 1
        return idx[self.rank::self.world_size].numpy()

    def state_dict(self) -> dict[str, Any]:
        """Generator state and number of draws."""
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


def hv_from_inst(inst: torch.Tensor) -> torch.Tensor:
    """HoVer-Net HV maps of a batch of instance maps, vectorised (CPU or GPU).

    For each nucleus, the horizontal (x, along the width) and vertical (y, along the height)
    offsets of its pixels from its centroid (mean pixel position); negative and positive
    offsets are scaled separately by their largest magnitude, so each side spans [-1, 0] or
    [0, 1]. Background is 0.

    Parameters
    ----------
    inst
        ``(B, H, W)`` integer instance ids, 0 = background (ids are per tile).

    Returns
    -------
    ``(B, 2, H, W)`` float32: channel 0 horizontal, channel 1 vertical.
    """
    if inst.ndim != 3:
        raise ValueError(f"inst must be (B, H, W), got {tuple(inst.shape)}")
    b, h, w = inst.shape
    dev = inst.device
    inst = inst.long()
    fg = inst > 0
    out = torch.zeros((b, 2, h, w), dtype=torch.float32, device=dev)
    if not bool(fg.any()):
        return out
    key = inst + torch.arange(b, device=dev).view(b, 1, 1) * (int(inst.max()) + 1)
    _, lab = torch.unique(key[fg], return_inverse=True)
    n = int(lab.max()) + 1
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64),
                            torch.arange(w, device=dev, dtype=torch.float64), indexing="ij")
    ys = ys.expand(b, h, w)[fg]
    xs = xs.expand(b, h, w)[fg]
    cnt = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lab, torch.ones_like(xs))
    for ch, coord in ((0, xs), (1, ys)):
        c = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lab, coord) / cnt
        d = coord - c[lab]
        pos = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce_(0, lab, d.clamp(min=0), "amax")
        neg = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce_(0, lab, (-d).clamp(min=0), "amax")
        scale = torch.where(d > 0, pos[lab], neg[lab])
        val = torch.where(scale > 0, d / scale.clamp(min=1e-12), torch.zeros_like(d))
        plane = out[:, ch]
        plane[fg] = val.float()
    return out


def hv_from_masks(inst: np.ndarray) -> np.ndarray:
    """HV maps of ``(B, H, W)`` instance maps on CPU with :func:`stlib.labels.masks.hv_maps` (``hv_source="masks"``)."""
    from stlib.labels.masks import hv_maps

    return np.stack([np.asarray(hv_maps(t), dtype=np.float32) for t in inst])


def to_device(b: Mapping[str, np.ndarray], device: torch.device, hv: np.ndarray | None) -> dict[str, torch.Tensor]:
    """A batch of :meth:`TileData.get` as tensors on ``device``: ``image`` (B,3,H,W) float in [0, 1], ``inst``
    (int64), ``type``, ``ignore``, ``conf`` (and ``hv`` when given); pinned, non-blocking copies on CUDA."""
    nb = device.type == "cuda"

    def t(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a))
        return (x.pin_memory() if nb else x).to(device, non_blocking=nb)

    out = {"image": t(b["images"]).permute(0, 3, 1, 2).float().div_(255.0),
           "inst": t(b["inst"]).long(), "type": t(b["type"]), "ignore": t(b["ignore"]), "conf": t(b["conf"])}
    if hv is not None:
        out["hv"] = t(hv)
    return out


class Batches:
    """Ordered batch reader: indices drawn in step order, arrays read by a thread pool."""

    def __init__(self, data: TileData, train_idx: np.ndarray, sampler: BalancedSampler, batch: int,
                 n_steps: int, workers: int, hv_masks: bool) -> None:
        self.data, self.train_idx, self.sampler = data, train_idx, sampler
        self.batch, self.remaining, self.hv_masks = batch, n_steps, hv_masks
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.queue: deque[tuple[dict[str, Any], Future | dict]] = deque()
        self.depth = max(1, workers + 1)

    def _read(self, idx: np.ndarray) -> dict[str, Any]:
        b = self.data.get(self.train_idx[idx])
        b["hv"] = hv_from_masks(b["inst"]) if self.hv_masks else None
        return b

    def _fill(self) -> None:
        while self.remaining > 0 and len(self.queue) < self.depth:
            idx = self.sampler.draw(self.batch)
            state = self.sampler.state_dict()
            self.remaining -= 1
            job = self.pool.submit(self._read, idx) if self.pool else self._read(idx)
            self.queue.append((state, job))

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        while True:
            self._fill()
            if not self.queue:
                return
            state, job = self.queue.popleft()
            yield state, (job.result() if isinstance(job, Future) else job)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


def training_data(config: TrainConfig) -> tuple[TileData, np.ndarray, np.ndarray, np.ndarray]:
    """The tile stores, the training and validation tiles and the sampling weight of each training tile."""
    data = TileData(config.store_paths())
    train_idx = data.select(config.train_splits, config.organs, config.exclude_organs)
    val_idx = data.select(config.val_splits, config.organs, config.exclude_organs)[: config.val_max_tiles]
    if not len(train_idx):
        raise InputError(f"no tiles in splits {list(config.train_splits)} (organs {list(config.organs) or 'all'})",
                         path=data.paths[0], fix="check train_splits / organs against meta.parquet")
    data.fit_stain(np.union1d(train_idx, val_idx), getattr(config, "stain_norm", "none"))
    counts = data.class_counts(train_idx, config.n_types) if config.balance_class else None
    weights = tile_weights(data.meta["organ"].to_numpy()[train_idx], counts, by_organ=config.balance_organ,
                           by_class=config.balance_class, max_boost=config.max_class_boost)
    if config.hv_source == "masks":
        import stlib.labels.masks  # noqa: F401  (fail early when missing)
    return data, train_idx, val_idx, weights
