"""Tissue architecture and nuclei of one synthetic field of view.

Architecture comes first (glands, acini, crypts, alveoli, epidermis, tumour nests/sheets,
stroma with fibres, immune aggregates, vessels, fat lobules); each nucleus then gets its fine
cell type from the compartment it sits in, and a shape drawn from the morphology of that type
(:data:`MORPHOLOGY`). Everything is in image pixels of the field (level-0 H&E px).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from stlib.demo.config import FINE_TYPE_TO_CLASS, OrganSpec

__all__ = ["Region", "Tissue", "MORPHOLOGY", "simulate_tissue", "nucleus_radius", "nucleus_polygons",
           "N_HARM"]


class Region:
    """Codes of the compartment map."""

    GLASS = 0
    STROMA = 1
    EPI = 2
    LUMEN = 3
    TUMOUR = 4
    FAT = 5
    VESSEL = 6
    IMMUNE = 7
    NECROSIS = 8
    MUSCLE = 9
    KERATIN = 10
    AIR = 11


#: fine type -> (major semi-axis µm, minor semi-axis µm, relative size sd, irregularity,
#: haematoxylin density, chromatin texture amplitude, vesicular (rim) strength)
MORPHOLOGY: dict[str, tuple[float, float, float, float, float, float, float]] = {
    "tumor": (5.0, 3.9, 0.18, 0.10, 0.55, 0.45, 0.6),
    "epithelial": (3.7, 2.7, 0.08, 0.035, 0.72, 0.15, 0.0),
    "melanocyte": (3.4, 2.7, 0.08, 0.05, 0.62, 0.2, 0.1),
    "t_cell": (2.5, 2.3, 0.08, 0.03, 1.15, 0.25, 0.0),
    "b_cell": (2.7, 2.5, 0.08, 0.03, 1.1, 0.25, 0.0),
    "plasma": (3.0, 2.5, 0.08, 0.04, 1.0, 0.55, 0.0),
    "macrophage": (3.7, 2.8, 0.10, 0.10, 0.6, 0.2, 0.0),
    "fibroblast": (6.0, 1.3, 0.18, 0.05, 0.95, 0.1, 0.0),
    "endothelial": (5.0, 1.2, 0.12, 0.04, 0.85, 0.1, 0.0),
    "smooth_muscle": (7.0, 1.5, 0.12, 0.03, 0.75, 0.1, 0.0),
    "adipocyte": (5.0, 1.1, 0.12, 0.04, 0.8, 0.1, 0.0),
    "dead": (1.7, 1.5, 0.2, 0.15, 1.7, 0.05, 0.0),
}
#: number of radial harmonics of a nucleus outline
N_HARM = 4


@dataclass
class Tissue:
    """A simulated field: compartment map, fibre orientation and the nuclei table."""

    regions: np.ndarray          # (H, W) uint8 Region codes
    fibre_angle: np.ndarray      # (H, W) float32 radians
    x: np.ndarray                # nucleus centre (px)
    y: np.ndarray
    a: np.ndarray                # semi-axes (px)
    b: np.ndarray
    theta: np.ndarray            # orientation of the major axis (rad)
    harm: np.ndarray             # (n, N_HARM, 2) cos/sin amplitudes of harmonics 2..N_HARM+1
    fine_type: np.ndarray        # (n,) str
    density: np.ndarray          # haematoxylin density
    texture: np.ndarray
    vesicular: np.ndarray
    fragmented: np.ndarray       # bool: karyorrhexis (dead)
    um_per_px: float
    #: what a dead cell was before it died (its compartment type; "tumor" in necrosis); the
    #: fine type itself for live cells. None for fields built before this was recorded.
    origin: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.x.size)

    @property
    def classes(self) -> np.ndarray:
        return np.array([FINE_TYPE_TO_CLASS[t] for t in self.fine_type], dtype=np.uint8)


def radius_cs(a, b, harm: np.ndarray, cd: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Outline radius given ``cos``/``sin`` of the angle relative to the major axis.

    ``a``, ``b`` and ``harm[..., k, :]`` must broadcast against ``cd``.
    """
    r = a * b / np.sqrt((b * cd) ** 2 + (a * sd) ** 2 + 1e-12)
    # harmonics k = 2.. via complex powers (no trigonometric calls)
    z = cd + 1j * sd
    zk = z * z
    mod = np.ones_like(r)
    for k in range(harm.shape[-2]):
        mod += harm[..., k, 0] * zk.real + harm[..., k, 1] * zk.imag
        zk = zk * z
    return r * np.maximum(mod, 0.35)


def nucleus_radius(a: np.ndarray, b: np.ndarray, theta: np.ndarray, harm: np.ndarray,
                   phi: np.ndarray) -> np.ndarray:
    """Radius of nuclei at polar angles ``phi`` (broadcast: nuclei along axis 0)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    theta = np.asarray(theta, dtype=float)
    harm = np.asarray(harm, dtype=float)
    extra = np.ndim(phi) - np.ndim(a)
    if extra > 0:
        a = a.reshape(a.shape + (1,) * extra)
        b = b.reshape(b.shape + (1,) * extra)
        theta = theta.reshape(theta.shape + (1,) * extra)
    if harm.ndim - 2 < np.ndim(phi):
        harm = harm.reshape(harm.shape[:-2] + (1,) * (np.ndim(phi) - (harm.ndim - 2)) + harm.shape[-2:])
    # move harmonic axes to the end for broadcasting against phi
    d = phi - theta
    cd, sd = np.cos(d), np.sin(d)
    hk = np.moveaxis(harm, (-2, -1), (0, 1))  # (K, 2, ...)
    r = a * b / np.sqrt((b * cd) ** 2 + (a * sd) ** 2 + 1e-12)
    z = cd + 1j * sd
    zk = z * z
    mod = np.ones_like(r)
    for k in range(hk.shape[0]):
        mod = mod + hk[k, 0] * zk.real + hk[k, 1] * zk.imag
        zk = zk * z
    return r * np.maximum(mod, 0.35)


def nucleus_polygons(x, y, a, b, theta, harm, n_vertices: int = 32) -> np.ndarray:
    """Vertices ``(n, n_vertices, 2)`` (x, y) of nucleus outlines, counter-clockwise."""
    phi = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[None, :]
    r = nucleus_radius(np.asarray(a)[:, None], np.asarray(b)[:, None], np.asarray(theta)[:, None],
                       np.asarray(harm), phi)
    return np.stack([np.asarray(x)[:, None] + r * np.cos(phi), np.asarray(y)[:, None] + r * np.sin(phi)], axis=-1)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _interp_matrix(n_out: int, n_in: int, step: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights from a grid of spacing ``step``."""
    pos = (np.arange(n_out) + 0.5) / step
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    t = np.clip(pos - i0, 0, 1)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - t
    m[np.arange(n_out), i0 + 1] += t
    return m


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean unit-sd smooth noise (computed on a coarse grid, then interpolated)."""
    step = max(1, int(sigma / 3))
    small = rng.standard_normal((shape[0] // step + 3, shape[1] // step + 3)).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma / step, mode="wrap")
    if step == 1:
        big = small[: shape[0], : shape[1]]
    else:
        big = _interp_matrix(shape[0], small.shape[0], step) @ small @ _interp_matrix(shape[1], small.shape[1], step).T
    big = big - big.mean()
    return (big / (big.std() + 1e-9)).astype(np.float32)


def _thin(points: np.ndarray, min_dist: float, rng: np.random.Generator, keep_first: int = 0) -> np.ndarray:
    """Indices of ``points`` kept so that no two are closer than ``min_dist`` (greedy, random order).

    The first ``keep_first`` points have priority (they are visited first).
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=int)
    order = np.concatenate([np.arange(keep_first), keep_first + rng.permutation(n - keep_first)])
    tree = cKDTree(points)
    pairs = tree.query_pairs(min_dist, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(n)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    # for every pair, the later (by rank) point must go if the earlier one is kept
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for i, j in pairs:
        if rank[i] < rank[j]:
            nbrs[i].append(j)
        else:
            nbrs[j].append(i)
    alive = np.ones(n, dtype=bool)
    for i in order:
        if alive[i]:
            for j in nbrs[i]:
                alive[j] = False
    return np.flatnonzero(alive)


def _sample_in_mask(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random points (x, y) inside a boolean mask."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size == 0 or n <= 0:
        return np.zeros((0, 2))
    pick = rng.choice(idx, size=n, replace=True)
    yy, xx = np.divmod(pick, mask.shape[1])
    return np.stack([xx + rng.random(n), yy + rng.random(n)], axis=1)


def _blob_shape(rng: np.random.Generator, irregular: float) -> np.ndarray:
    """Harmonic amplitudes (N_HARM, 2) of an irregular outline."""
    scale = irregular / np.arange(2, N_HARM + 2)
    return rng.normal(0, 1, (N_HARM, 2)) * scale[:, None]


class _Builder:
    """Accumulates structures (compartment map) and nuclei."""

    def __init__(self, shape: tuple[int, int], um_per_px: float, rng: np.random.Generator,
                 organ: OrganSpec, density: float) -> None:
        self.shape = shape
        self.um = um_per_px
        self.rng = rng
        self.organ = organ
        self.density = density
        self.regions = np.full(shape, Region.STROMA, dtype=np.uint8)
        self.nuc: dict[str, list] = {k: [] for k in ("x", "y", "a", "b", "theta", "harm", "fine_type")}
        self.circles: list[tuple[float, float, float]] = []  # placed structures (x, y, r) in px

    # -- units -------------------------------------------------------------------
    def px(self, um: float) -> float:
        return um / self.um

    # -- nuclei --------------------------------------------------------------------
    def add_nuclei(self, x: np.ndarray, y: np.ndarray, types: np.ndarray | str,
                   theta: np.ndarray | None = None, scale: float = 1.0) -> None:
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        n = x.size
        if n == 0:
            return
        types = np.full(n, types, dtype=object) if isinstance(types, str) else np.asarray(types, dtype=object)
        rng = self.rng
        a = np.empty(n)
        b = np.empty(n)
        harm = np.empty((n, N_HARM, 2))
        th = rng.uniform(0, np.pi, n) if theta is None else np.asarray(theta, dtype=float) + rng.normal(0, 0.12, n)
        s_org = self.organ.nucleus_scale * scale
        for t in np.unique(types):
            m = types == t
            k = int(m.sum())
            ma, mb, sd, irr, *_ = MORPHOLOGY[t]
            size = np.exp(rng.normal(0, sd, k))
            elong = np.exp(rng.normal(0, 0.08, k))
            a[m] = self.px(ma * s_org) * size * elong
            b[m] = self.px(mb * s_org) * size / elong
            harm[m] = rng.normal(0, 1, (k, N_HARM, 2)) * (irr / np.arange(1, N_HARM + 1))[None, :, None]
            if t == "macrophage":  # kidney-bean indentation
                harm[m, 0, 0] += 0.05
                harm[m, 1, 0] -= 0.08
        self.nuc["x"].append(x)
        self.nuc["y"].append(y)
        self.nuc["a"].append(a)
        self.nuc["b"].append(b)
        self.nuc["theta"].append(th)
        self.nuc["harm"].append(harm)
        self.nuc["fine_type"].append(types)

    # -- placement of round structures --------------------------------------------------
    def place(self, radius_px: float, *, allowed: np.ndarray | None = None, gap_px: float = 0.0,
              tries: int = 60) -> tuple[float, float] | None:
        """A centre for a circle of ``radius_px`` that overlaps no placed structure."""
        h, w = self.shape
        cx = self.rng.uniform(-0.1 * radius_px, w + 0.1 * radius_px, tries)
        cy = self.rng.uniform(-0.1 * radius_px, h + 0.1 * radius_px, tries)
        ok = np.ones(tries, bool)
        if allowed is not None:
            ok &= allowed[np.clip(cy.astype(int), 0, h - 1), np.clip(cx.astype(int), 0, w - 1)]
        if self.circles:
            c = np.asarray(self.circles)
            d2 = (cx[:, None] - c[None, :, 0]) ** 2 + (cy[:, None] - c[None, :, 1]) ** 2
            ok &= (d2 > (radius_px + c[None, :, 2] + gap_px) ** 2).all(1)
        hit = np.flatnonzero(ok)
        if hit.size == 0:
            return None
        i = int(hit[0])
        self.circles.append((float(cx[i]), float(cy[i]), radius_px))
        return float(cx[i]), float(cy[i])

    def polar_patch(self, cx: float, cy: float, rmax: float):
        """Bounding-box slices and polar coordinates of the pixels around a centre."""
        h, w = self.shape
        x0, x1 = max(int(cx - rmax - 2), 0), min(int(cx + rmax + 3), w)
        y0, y1 = max(int(cy - rmax - 2), 0), min(int(cy + rmax + 3), h)
        if x1 <= x0 or y1 <= y0:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        return (slice(y0, y1), slice(x0, x1)), np.hypot(dx, dy), np.arctan2(dy, dx)

    def nuclei_arrays(self) -> dict[str, np.ndarray]:
        if not self.nuc["x"]:
            return {"x": np.zeros(0), "y": np.zeros(0), "a": np.zeros(0), "b": np.zeros(0),
                    "theta": np.zeros(0), "harm": np.zeros((0, N_HARM, 2)), "fine_type": np.zeros(0, dtype=object)}
        return {k: np.concatenate(v) for k, v in self.nuc.items()}


# ---------------------------------------------------------------------------------------
# structures
# ---------------------------------------------------------------------------------------

def _ring_structure(bld: _Builder, cx: float, cy: float, r_out: float, thick: float, *, aspect: float,
                    rot: float, irregular: float, region: int, cell_type: str, rows: int, spacing_um: float,
                    basal_frac: float, crowd: float = 0.0, lumen_region: int = Region.LUMEN) -> None:
    """A gland / acinus / crypt: epithelial ring of ``thick`` px around a lumen."""
    rng = bld.rng
    harm = _blob_shape(rng, irregular)
    a, b = r_out * np.sqrt(aspect), r_out / np.sqrt(aspect)
    patch = bld.polar_patch(cx, cy, max(a, b) * (1 + 2 * irregular) + 2)
    if patch is None:
        return
    sl, r, phi = patch
    rb = nucleus_radius(a, b, rot, harm, phi)
    inner = rb - thick
    reg = bld.regions[sl]
    reg[(r <= rb) & (r > inner)] = region
    reg[(r <= inner)] = lumen_region
    # nuclei along the ring
    perim = np.pi * (a + b)
    spacing = bld.px(spacing_um)
    n = max(int(perim / spacing), 4)
    xs, ys, ths = [], [], []
    for row in range(rows):
        ang = np.sort(rng.uniform(0, 2 * np.pi, n)) if crowd > 0 else \
            np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        ang = ang + rng.normal(0, 0.25 / n * 2 * np.pi, n)
        rr = nucleus_radius(a, b, rot, harm, ang)
        depth = thick * (basal_frac + row * (1 - basal_frac) / max(rows, 1)) + rng.normal(0, thick * (0.05 + crowd * 0.1), n)
        rad = np.clip(rr - depth, rr * 0.15, None)
        xs.append(cx + rad * np.cos(ang))
        ys.append(cy + rad * np.sin(ang))
        ths.append(ang)  # long axis perpendicular to the basement membrane (radial)
    x, y, th = np.concatenate(xs), np.concatenate(ys), np.concatenate(ths)
    keep = (x >= -5) & (y >= -5) & (x < bld.shape[1] + 5) & (y < bld.shape[0] + 5)
    bld.add_nuclei(x[keep], y[keep], cell_type, theta=th[keep])


def _fill_compartment(bld: _Builder, mask: np.ndarray, cell_type: str | tuple, *, min_dist_um: float,
                      probs: tuple | None = None, theta: np.ndarray | None = None, fill: float = 1.0) -> None:
    """Pack nuclei into ``mask`` at a minimum distance (overlap when small)."""
    area_um2 = mask.sum() * bld.um ** 2
    if area_um2 <= 0:
        return
    n_cand = int(area_um2 / (min_dist_um ** 2) * 2.0 * bld.density * fill) + 1
    pts = _sample_in_mask(mask, n_cand, bld.rng)
    keep = _thin(pts, bld.px(min_dist_um), bld.rng)
    pts = pts[keep]
    if fill < 1.0:
        pts = pts[bld.rng.random(len(pts)) < fill]
    if len(pts) == 0:
        return
    if isinstance(cell_type, str):
        types = np.full(len(pts), cell_type, dtype=object)
    else:
        types = bld.rng.choice(np.asarray(cell_type, dtype=object), size=len(pts), p=probs)
    th = None
    if theta is not None:
        iy = np.clip(pts[:, 1].astype(int), 0, mask.shape[0] - 1)
        ix = np.clip(pts[:, 0].astype(int), 0, mask.shape[1] - 1)
        th = theta[iy, ix]
    bld.add_nuclei(pts[:, 0], pts[:, 1], types, theta=th)


def _vessels(bld: _Builder, n: int) -> None:
    rng = bld.rng
    for _ in range(n):
        big = rng.random() < 0.35
        r_l = bld.px(rng.uniform(7, 13) if big else rng.uniform(2.5, 6))
        wall = bld.px(rng.uniform(5, 9)) if big else bld.px(1.5)
        c = bld.place(r_l + wall, allowed=bld.regions == Region.STROMA, gap_px=bld.px(4))
        if c is None:
            continue
        cx, cy = c
        asp = rng.uniform(1.0, 1.8)
        rot = rng.uniform(0, np.pi)
        harm = _blob_shape(rng, 0.08)
        a, b = r_l * np.sqrt(asp), r_l / np.sqrt(asp)
        patch = bld.polar_patch(cx, cy, max(a, b) * 1.3 + wall + 2)
        if patch is None:
            continue
        sl, r, phi = patch
        rb = nucleus_radius(a, b, rot, harm, phi)
        reg = bld.regions[sl]
        if big:
            reg[(r > rb) & (r <= rb + wall) & (reg == Region.STROMA)] = Region.MUSCLE
        reg[r <= rb] = Region.VESSEL
        perim = np.pi * (a + b)
        ne = max(int(perim / bld.px(14)), 2)
        ang = np.linspace(0, 2 * np.pi, ne, endpoint=False) + rng.uniform(0, 6.3)
        rr = nucleus_radius(a, b, rot, harm, ang) + bld.px(0.9)
        bld.add_nuclei(cx + rr * np.cos(ang), cy + rr * np.sin(ang), "endothelial", theta=ang + np.pi / 2)
        if big:
            nm = max(int(np.pi * (a + b + 2 * wall) / bld.px(9)), 3)
            ang = np.sort(rng.uniform(0, 2 * np.pi, nm))
            rr = nucleus_radius(a, b, rot, harm, ang) + wall * rng.uniform(0.3, 0.8, nm)
            bld.add_nuclei(cx + rr * np.cos(ang), cy + rr * np.sin(ang), "smooth_muscle", theta=ang + np.pi / 2)


def _fat(bld: _Builder, area_frac: float) -> None:
    if area_frac <= 0:
        return
    rng = bld.rng
    h, w = bld.shape
    lob = _smooth_noise(rng, bld.shape, bld.px(60))
    thr = np.quantile(lob, 1 - area_frac)
    zone = (lob > thr) & (bld.regions == Region.STROMA)
    if zone.sum() < bld.px(30) ** 2:
        return
    # adipocytes: Voronoi cells of seeds ~ 50 µm apart
    n_seed = int(zone.sum() * bld.um ** 2 / (45.0 ** 2) * 2) + 2
    seeds = _sample_in_mask(zone, n_seed, rng)
    seeds = seeds[_thin(seeds, bld.px(35), rng)]
    if len(seeds) < 2:
        return
    ys, xs = np.nonzero(zone)
    tree = cKDTree(seeds)
    d, _ = tree.query(np.stack([xs, ys], 1), k=2)
    interior = (d[:, 1] - d[:, 0]) > bld.px(1.6)
    bld.regions[ys[interior], xs[interior]] = Region.FAT
    # a few flat adipocyte nuclei pressed against membranes
    k = max(1, len(seeds) // 4)
    pick = rng.choice(len(seeds), size=min(k, len(seeds)), replace=False)
    for i in pick:
        ang = rng.uniform(0, 2 * np.pi)
        dd, _ = tree.query(seeds[i], k=2)
        half = dd[1] / 2 - bld.px(1.5)
        bld.add_nuclei(seeds[i, 0] + half * np.cos(ang), seeds[i, 1] + half * np.sin(ang), "adipocyte",
                       theta=np.array([ang + np.pi / 2]))


def _alveoli(bld: _Builder, zone: np.ndarray) -> None:
    """Alveolar parenchyma: air spaces separated by thin septa with flat pneumocytes."""
    rng = bld.rng
    n_seed = int(zone.sum() * bld.um ** 2 / (55.0 ** 2) * 2) + 2
    seeds = _sample_in_mask(zone, n_seed, rng)
    seeds = seeds[_thin(seeds, bld.px(45), rng)]
    if len(seeds) < 2:
        return
    ys, xs = np.nonzero(zone)
    tree = cKDTree(seeds)
    d, _ = tree.query(np.stack([xs, ys], 1), k=2)
    gap = d[:, 1] - d[:, 0]
    air = gap > bld.px(rng.uniform(3.0, 5.0))
    bld.regions[ys[air], xs[air]] = Region.AIR
    # septal nuclei: pneumocytes (epithelial, flat), capillary endothelium, a few fibroblasts
    wall = ~air
    wx, wy = xs[wall], ys[wall]
    if wx.size == 0:
        return
    n = int(wx.size * bld.um ** 2 / 60.0 * bld.density)
    pick = rng.choice(wx.size, size=min(n, wx.size), replace=False)
    pts = np.stack([wx[pick] + 0.5, wy[pick] + 0.5], 1)
    pts = pts[_thin(pts, bld.px(8), rng)]
    types = rng.choice(np.array(["epithelial", "endothelial", "fibroblast", "macrophage"], dtype=object),
                       size=len(pts), p=[0.5, 0.3, 0.15, 0.05])
    # orient along the septum: perpendicular to the line between the two nearest seeds
    _, nn = tree.query(pts, k=2)
    v = seeds[nn[:, 1]] - seeds[nn[:, 0]]
    th = np.arctan2(v[:, 1], v[:, 0]) + np.pi / 2
    bld.add_nuclei(pts[:, 0], pts[:, 1], types, theta=th)
    # alveolar macrophages floating in air spaces
    airm = bld.regions == Region.AIR
    nm = int(airm.sum() * bld.um ** 2 / 4000.0 * bld.density)
    if nm:
        p = _sample_in_mask(airm, nm, rng)
        bld.add_nuclei(p[:, 0], p[:, 1], "macrophage")


def _epidermis(bld: _Builder, melanoma: bool) -> np.ndarray:
    """Epidermis band at the top (with keratin and glass above); returns the dermis mask."""
    rng = bld.rng
    h, w = bld.shape
    xs = np.arange(w)
    top = bld.px(rng.uniform(8, 20)) + bld.px(6) * _smooth_noise(rng, (1, w), bld.px(40))[0]
    kera = top + bld.px(rng.uniform(8, 14))
    ridge = bld.px(rng.uniform(45, 65)) + bld.px(14) * np.sin(xs / bld.px(rng.uniform(35, 55)) + rng.uniform(0, 6)) \
        + bld.px(6) * _smooth_noise(rng, (1, w), bld.px(20))[0]
    base = kera + ridge
    yy = np.arange(h)[:, None]
    bld.regions[yy < top[None, :]] = Region.GLASS
    bld.regions[(yy >= top[None, :]) & (yy < kera[None, :])] = Region.KERATIN
    epi = (yy >= kera[None, :]) & (yy < base[None, :])
    bld.regions[epi] = Region.EPI
    # stratified keratinocytes (flatter towards the surface), basal row denser
    pts = _sample_in_mask(epi, int(epi.sum() * bld.um ** 2 / 30.0) + 1, rng)
    pts = pts[_thin(pts, bld.px(7.0 / np.sqrt(bld.density)), rng)]
    ix = np.clip(pts[:, 0].astype(int), 0, w - 1)
    depth = (pts[:, 1] - kera[ix]) / np.maximum(base[ix] - kera[ix], 1)
    upper = depth < 0.35
    bld.add_nuclei(pts[upper, 0], pts[upper, 1], "epithelial", theta=np.zeros(upper.sum()), scale=0.9)
    bld.add_nuclei(pts[~upper, 0], pts[~upper, 1], "epithelial")
    # basal layer: one row along the base; ~1 in 8 a melanocyte
    nb = int(w / bld.px(6.5))
    bx = np.sort(rng.uniform(0, w, nb))
    by = base[np.clip(bx.astype(int), 0, w - 1)] - bld.px(3.0)
    mel = rng.random(nb) < (0.25 if melanoma else 0.12)
    bld.add_nuclei(bx[~mel], by[~mel], "epithelial", theta=np.full((~mel).sum(), np.pi / 2))
    bld.add_nuclei(bx[mel], by[mel], "melanocyte")
    return yy >= base[None, :] + bld.px(2)


# ---------------------------------------------------------------------------------------
# the field
# ---------------------------------------------------------------------------------------

def simulate_tissue(organ: OrganSpec, shape: tuple[int, int], um_per_px: float, rng: np.random.Generator,
                    *, cancer: bool, density: float = 1.0, dead_fraction: float = 0.03,
                    glass: bool = True) -> Tissue:
    """Simulate one field of view of ``organ``.

    Parameters
    ----------
    organ
        Organ specification (architecture, stain, programmes).
    shape
        ``(H, W)`` in pixels.
    um_per_px
        Pixel size.
    rng
        Random generator (the only source of randomness).
    cancer
        Whether tumour compartments are present (healthy fields have no tumour cells).
    density
        Multiplier of cell densities.
    dead_fraction
        Fraction of nuclei turned into dead (pyknotic / fragmented) cells, preferentially in
        tumour and necrosis.
    glass
        Allow a bit of empty glass at the field border.
    """
    bld = _Builder(shape, um_per_px, rng, organ, density)
    h, w = shape
    area_um2 = h * w * um_per_px ** 2
    fibre = (np.pi * rng.random() + 0.9 * _smooth_noise(rng, shape, bld.px(50))).astype(np.float32)
    if glass and organ.normal != "epidermis" and rng.random() < 0.5:
        _glass_edge(bld, rng, shape)
    dermis = None
    if organ.normal == "epidermis":
        dermis = _epidermis(bld, melanoma=cancer)
    if cancer:
        _tumour_compartments(bld, rng, organ, shape, dermis, area_um2, um_per_px, density)
    _normal_epithelium(bld, rng, organ, shape, cancer, area_um2, um_per_px, density)
    if organ.aggregate:
        _immune_aggregate(bld, rng)
    # vessels and fat
    _vessels(bld, max(1, int(area_um2 / (110.0 ** 2) * 1.2)))
    _fat(bld, organ.fat_area)
    _stroma_cells(bld, rng, organ, cancer, dermis, fibre, um_per_px)
    return _finish_tissue(bld, rng, organ, shape, fibre, um_per_px, dead_fraction)


def _glass_edge(bld: _Builder, rng: np.random.Generator, shape: tuple[int, int]) -> None:
    """Glass at one edge of the field (the tissue border)."""
    h, w = shape
    edge = _smooth_noise(rng, shape, bld.px(40))
    side = rng.integers(4)
    ramp = [np.linspace(1, 0, h)[:, None], np.linspace(0, 1, h)[:, None],
            np.linspace(1, 0, w)[None, :], np.linspace(0, 1, w)[None, :]][side]
    bld.regions[(ramp * 4 + 0.4 * edge) > 3.7] = Region.GLASS


def _tumour_compartments(bld: _Builder, rng: np.random.Generator, organ: OrganSpec, shape: tuple[int, int],
                         dermis: np.ndarray | None, area_um2: float, um_per_px: float, density: float) -> None:
    """Tumour nests / sheets (with comedo-like necrosis) or irregular, stratified tumour glands."""
    tum_area = min(0.55, organ.epi_area * 1.8)
    if organ.tumour in ("nests", "sheets"):
        noise = _smooth_noise(rng, shape, bld.px(35 if organ.tumour == "nests" else 70))
        allowed = bld.regions == Region.STROMA
        if dermis is not None:
            allowed &= dermis
        vals = noise[allowed]
        if vals.size:
            thr = np.quantile(vals, 1 - tum_area)
            tmask = allowed & (noise > thr)
            tmask = ndi.binary_opening(tmask, iterations=2)
            bld.regions[tmask] = Region.TUMOUR
            # comedo-like necrosis in the middle of large nests (breast)
            if organ.tumour == "nests":
                dist = ndi.distance_transform_edt(tmask)
                nec = dist > bld.px(35)
                bld.regions[nec] = Region.NECROSIS
                tmask &= ~nec
            md = 2 * MORPHOLOGY["tumor"][1] * organ.nucleus_scale * (1.05 if organ.tumour == "sheets" else 0.95)
            _fill_compartment(bld, tmask, "tumor", min_dist_um=md)
            nec = bld.regions == Region.NECROSIS
            if nec.any():
                _fill_compartment(bld, nec, "dead", min_dist_um=7.0, fill=0.35)
    else:  # tumour glands: irregular, stratified, back to back
        n_gl = max(int(area_um2 * tum_area / (np.pi * 30 ** 2)), 2)
        for _ in range(n_gl * 2):
            r_out = bld.px(rng.uniform(18, 38))
            c = bld.place(r_out, allowed=bld.regions == Region.STROMA, gap_px=bld.px(3))
            if c is None:
                continue
            thick = bld.px(rng.uniform(11, 17))
            _ring_structure(bld, c[0], c[1], r_out, thick, aspect=rng.uniform(1.0, 2.2), rot=rng.uniform(0, np.pi),
                            irregular=0.22, region=Region.TUMOUR, cell_type="tumor", rows=2,
                            spacing_um=7.5 / np.sqrt(density), basal_frac=0.3, crowd=1.0,
                            lumen_region=Region.NECROSIS if organ.name == "Bowel" else Region.LUMEN)
            if sum(np.pi * r ** 2 for *_, r in bld.circles) * um_per_px ** 2 > area_um2 * tum_area:
                break
        nec = bld.regions == Region.NECROSIS
        if nec.any():
            _fill_compartment(bld, nec, "dead", min_dist_um=6.0, fill=0.4)


def _normal_epithelium(bld: _Builder, rng: np.random.Generator, organ: OrganSpec, shape: tuple[int, int],
                       cancer: bool, area_um2: float, um_per_px: float, density: float) -> None:
    """Glands, acini or crypts placed in stroma up to the organ's epithelial area, or alveoli."""
    epi_frac = organ.epi_area * (0.35 if cancer else 1.0)
    if organ.normal in ("glands", "acini", "crypts") and epi_frac > 0:
        if organ.normal == "glands":
            r_rng, thick_um, asp, sp, rows = (14, 26), 9.0, (1.0, 1.6), 6.5, 1
        elif organ.normal == "acini":
            r_rng, thick_um, asp, sp, rows = (9, 13), 8.5, (1.0, 1.3), 7.5, 1
        else:
            r_rng, thick_um, asp, sp, rows = (18, 24), 11.0, (1.8, 2.6), 5.5, 1
        target = area_um2 * epi_frac
        placed = 0.0
        crypt_rot = rng.uniform(0, np.pi)
        for _ in range(400):
            r_out = bld.px(rng.uniform(*r_rng))
            c = bld.place(r_out * (1.4 if organ.normal == "crypts" else 1.0), allowed=bld.regions == Region.STROMA,
                          gap_px=bld.px(2.5 if organ.normal == "acini" else 5))
            if c is None:
                continue
            thick = min(bld.px(thick_um), r_out * 0.8)
            _ring_structure(bld, c[0], c[1], r_out, thick, aspect=rng.uniform(*asp),
                            rot=crypt_rot + rng.normal(0, 0.2) if organ.normal == "crypts" else rng.uniform(0, np.pi),
                            irregular=0.05, region=Region.EPI, cell_type="epithelial", rows=rows,
                            spacing_um=sp / np.sqrt(density), basal_frac=0.22)
            placed += np.pi * (r_out * um_per_px) ** 2
            if placed >= target:
                break
    elif organ.normal == "alveoli":
        zone = bld.regions == Region.STROMA
        free = ndi.binary_erosion(zone, iterations=int(bld.px(6)))
        if cancer:  # keep a stroma band around the tumour
            free &= _smooth_noise(rng, shape, bld.px(60)) > -0.3
        _alveoli(bld, free)


def _immune_aggregate(bld: _Builder, rng: np.random.Generator) -> None:
    """One lymphoid aggregate in the stroma (its region; cells come with the stroma cells)."""
    r = bld.px(rng.uniform(22, 38))
    c = bld.place(r, allowed=bld.regions == Region.STROMA, gap_px=0)
    if c is not None:
        patch = bld.polar_patch(c[0], c[1], r * 1.3)
        if patch is not None:
            sl, rr, phi = patch
            rb = nucleus_radius(r, r * 0.85, 0.0, _blob_shape(rng, 0.15), phi)
            reg = bld.regions[sl]
            reg[(rr <= rb) & (reg == Region.STROMA)] = Region.IMMUNE


def _stroma_cells(bld: _Builder, rng: np.random.Generator, organ: OrganSpec, cancer: bool,
                  dermis: np.ndarray | None, fibre: np.ndarray, um_per_px: float) -> None:
    """Fibroblasts along the fibres, scattered and aggregated immune cells, tumour-infiltrating lymphocytes."""
    stroma = bld.regions == Region.STROMA
    if dermis is not None:
        stroma &= dermis
    imm = organ.immune_density * (1.6 if cancer else 1.0)
    p_imm = min(0.15 * imm, 0.55)
    probs = np.array([1 - p_imm, p_imm * 0.5, p_imm * 0.25, p_imm * 0.25])
    _fill_compartment(bld, stroma, ("fibroblast", "t_cell", "plasma", "macrophage"), min_dist_um=11.0,
                      probs=probs / probs.sum(), theta=fibre, fill=0.75)
    immune = bld.regions == Region.IMMUNE
    if immune.any():
        _fill_compartment(bld, immune, ("t_cell", "b_cell", "plasma", "macrophage"), min_dist_um=5.6,
                          probs=(0.5, 0.38, 0.06, 0.06))
    # tumour-infiltrating lymphocytes
    tum = bld.regions == Region.TUMOUR
    if tum.any():
        n_til = int(tum.sum() * um_per_px ** 2 / 900.0 * imm)
        p = _sample_in_mask(tum, n_til, rng)
        bld.add_nuclei(p[:, 0], p[:, 1], rng.choice(np.array(["t_cell", "macrophage"], dtype=object), len(p), p=(0.8, 0.2)))
    # muscle layer cells (already have the wall nuclei of vessels)


def _finish_tissue(bld: _Builder, rng: np.random.Generator, organ: OrganSpec, shape: tuple[int, int],
                   fibre: np.ndarray, um_per_px: float, dead_fraction: float) -> Tissue:
    """Nuclei off the field or on glass removed, dead cells drawn, per-nucleus looks, raster order."""
    h, w = shape
    arr = bld.nuclei_arrays()
    # remove nuclei outside the field or on glass
    inside = (arr["x"] > -2) & (arr["y"] > -2) & (arr["x"] < w + 2) & (arr["y"] < h + 2)
    ix = np.clip(arr["x"].astype(int), 0, w - 1)
    iy = np.clip(arr["y"].astype(int), 0, h - 1)
    inside &= bld.regions[iy, ix] != Region.GLASS
    arr = {k: v[inside] for k, v in arr.items()}
    # dead cells: scattered apoptotic bodies, more in tumour
    n = arr["x"].size
    ft = arr["fine_type"]
    origin = np.where(ft == "dead", "tumor", ft).astype(object)  # necrosis: dead tumour cells
    already = int((ft == "dead").sum())
    want = int(round(dead_fraction * n)) - already
    if want > 0:
        wgt = np.where(ft == "tumor", 4.0, 1.0) * (ft != "dead") * np.isin(ft, ["endothelial", "smooth_muscle",
                                                                             "adipocyte"], invert=True)
        if wgt.sum() > 0:
            pick = rng.choice(n, size=min(want, int((wgt > 0).sum())), replace=False, p=wgt / wgt.sum())
            ft[pick] = "dead"
            ma, mb, sd, irr, *_ = MORPHOLOGY["dead"]
            s = np.exp(rng.normal(0, sd, pick.size)) * organ.nucleus_scale
            arr["a"][pick] = ma / um_per_px * s
            arr["b"][pick] = mb / um_per_px * s
            arr["harm"][pick] = rng.normal(0, 1, (pick.size, N_HARM, 2)) * (irr / np.arange(1, N_HARM + 1))[None, :, None]
    ft = arr["fine_type"]
    dens = np.array([MORPHOLOGY[t][4] for t in ft]) * np.exp(rng.normal(0, 0.1, n))
    tex = np.array([MORPHOLOGY[t][5] for t in ft])
    ves = np.array([MORPHOLOGY[t][6] for t in ft])
    frag = (ft == "dead") & (rng.random(n) < 0.3)
    # sort by y then x so ids follow the image raster (stable, deterministic)
    order = np.lexsort((arr["x"], arr["y"]))
    return Tissue(regions=bld.regions, fibre_angle=fibre, x=arr["x"][order], y=arr["y"][order], a=arr["a"][order],
                  b=arr["b"][order], theta=arr["theta"][order], harm=arr["harm"][order],
                  fine_type=np.asarray(ft[order]).astype(str), density=dens[order], texture=tex[order],
                  vesicular=ves[order], fragmented=frag[order], um_per_px=um_per_px,
                  origin=np.asarray(origin[order]).astype(str))
