"""Render a simulated field as an H&E image: optical density, Beer-Lambert, scanner effects.

Haematoxylin and eosin amounts are painted per pixel (compartments, fibres, cytoplasm,
nuclei with chromatin texture, nucleoli, red cells), mixed with the organ's stain vectors
(jittered per sample) into RGB optical density and converted by Beer-Lambert
(``I = 255 * 10**-OD``); then optical blur, an out-of-focus area and sensor noise are applied.
JPEG artefacts come from the pyramidal TIFF writer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from stlib.demo.config import OrganSpec
from stlib.demo.tissue import Region, Tissue, _smooth_noise, radius_cs

__all__ = ["Stain", "sample_stain", "post_xenium_stain", "POST_XENIUM_EXTRA_BLUR_PX", "render_he"]


@dataclass(frozen=True)
class Stain:
    """Stain vectors (unit RGB absorbances) and strengths of one slide."""

    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_strength: float
    e_strength: float


def sample_stain(organ: OrganSpec, rng: np.random.Generator, jitter: float) -> Stain:
    """The organ's stain, jittered per slide by ``jitter`` (relative)."""
    h = np.asarray(organ.h_vec) * np.exp(rng.normal(0, jitter, 3))
    e = np.asarray(organ.e_vec) * np.exp(rng.normal(0, jitter, 3))
    return Stain(tuple((h / np.linalg.norm(h)).tolist()), tuple((e / np.linalg.norm(e)).tolist()),
                 float(organ.h_strength * np.exp(rng.normal(0, jitter))),
                 float(organ.e_strength * np.exp(rng.normal(0, jitter))))


#: haematoxylin OD direction that post-Xenium staining drifts towards (greyer: less blue-specific)
_GREY_H = (0.58, 0.62, 0.52)
#: extra optical blur (px) of a post-Xenium slide at strength 1 (softer chromatin)
POST_XENIUM_EXTRA_BLUR_PX = 0.35


def post_xenium_stain(stain: Stain, strength: float) -> Stain:
    """The stain of a slide stained with H&E after a Xenium run (``strength`` in [0, 1]).

    Modelled, not measured: at strength 1 the haematoxylin is 35% weaker and 30% of the way to a
    greyer absorbance direction, the eosin 25% stronger. Deterministic (draws no random
    numbers), so a cohort with ``strength = 0`` is identical to one without the shift.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0:
        return stain
    h = (1 - 0.3 * strength) * np.asarray(stain.h_vec) + 0.3 * strength * np.asarray(_GREY_H) / np.linalg.norm(_GREY_H)
    return Stain(tuple((h / np.linalg.norm(h)).tolist()), stain.e_vec,
                 float(stain.h_strength * (1 - 0.35 * strength)), float(stain.e_strength * (1 + 0.25 * strength)))


def _fibres(tissue: Tissue, rng: np.random.Generator) -> np.ndarray:
    """Wavy collagen fibre pattern (0..1) following the fibre-angle field."""
    h, w = tissue.regions.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    th = tissue.fibre_angle
    period = 2.6 / tissue.um_per_px
    phase = 5.0 * _smooth_noise(rng, (h, w), 12 / tissue.um_per_px) + 1.5 * _smooth_noise(rng, (h, w), 2.0)
    s = np.sin(2 * np.pi * (-xx * np.sin(th) + yy * np.cos(th)) / period + phase)
    gaps = _smooth_noise(rng, (h, w), 5 / tissue.um_per_px)
    return np.clip(0.5 + 0.3 * s + 0.45 * gaps, 0, 1).astype(np.float32)


def render_he(tissue: Tissue, stain: Stain, rng: np.random.Generator, *, blur_px: float = 0.7,
              defocus_px: float = 1.8, defocus_fraction: float = 0.1, noise_sd: float = 2.5,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Render ``tissue`` to RGB.

    Returns
    -------
    rgb
        ``(H, W, 3)`` uint8 image.
    inst
        ``(H, W)`` int32 instance map of the rendered nuclei (nucleus ``i`` -> ``i + 1``; later
        nuclei overwrite earlier ones where they overlap).
    """
    H, E, fine = _background(tissue, rng)
    inst = _paint_nuclei(tissue, rng, H, E, fine)
    return _optical_density_to_rgb(H, E, stain, rng, um=tissue.um_per_px, blur_px=blur_px, defocus_px=defocus_px,
                                   defocus_fraction=defocus_fraction, noise_sd=noise_sd), inst


def _background(tissue: Tissue, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical density of everything but the nuclei (and the fine noise field)."""
    reg = tissue.regions
    h, w = reg.shape
    um = tissue.um_per_px
    H = np.zeros((h, w), np.float32)
    E = np.zeros((h, w), np.float32)
    fine = _smooth_noise(rng, (h, w), 0.8)
    mid = _smooth_noise(rng, (h, w), 2.5)

    fib = _fibres(tissue, rng)
    st = reg == Region.STROMA
    E[st] = (0.12 + 0.26 * fib[st]) * (1 + 0.1 * mid[st])
    H[st] = 0.02
    for code, e_val, h_val in ((Region.EPI, 0.27, 0.06), (Region.TUMOUR, 0.24, 0.11), (Region.LUMEN, 0.04, 0.0),
                               (Region.IMMUNE, 0.16, 0.05), (Region.MUSCLE, 0.55, 0.03), (Region.VESSEL, 0.06, 0.0),
                               (Region.NECROSIS, 0.42, 0.10), (Region.KERATIN, 0.5, 0.01)):
        m = reg == code
        if m.any():
            E[m] = e_val * (1 + 0.15 * mid[m])
            H[m] = h_val * (1 + 0.3 * fine[m])
    # necrotic debris: speckles of haematoxylin
    nec = reg == Region.NECROSIS
    if nec.any():
        H[nec] += np.clip(fine[nec] - 1.2, 0, None) * 0.8
    # keratin lamellae
    ker = reg == Region.KERATIN
    if ker.any():
        yy = np.nonzero(ker)[0]
        E[ker] *= 0.6 + 0.4 * np.sin(yy * um / 1.5 * 2 * np.pi + 3 * mid[ker]) ** 2
    # cell borders in epithelium / tumour (Voronoi edges of the nuclei) and pale cytoplasm
    cells = (reg == Region.EPI) | (reg == Region.TUMOUR)
    if cells.any() and tissue.n >= 2:
        ys, xs = np.nonzero(cells)
        tree = cKDTree(np.stack([tissue.x, tissue.y], 1))
        d, _ = tree.query(np.stack([xs, ys], 1), k=2)
        edge = np.exp(-((d[:, 1] - d[:, 0]) * um / 0.5) ** 2)
        E[ys, xs] += 0.12 * edge
    # red blood cells in vessels
    ves = reg == Region.VESSEL
    if ves.any():
        n_rbc = int(ves.sum() * um ** 2 / 30.0)
        idx = np.flatnonzero(ves.ravel())
        pick = rng.choice(idx, size=n_rbc)
        rbc = np.zeros((h, w), np.float32)
        rbc.ravel()[pick] = 1.0
        rbc = ndi.gaussian_filter(rbc, 2.6 / um / 2) * (2.6 / um) ** 2 * 1.6
        E += np.clip(rbc, 0, 0.95) * ves
    return H, E, fine


def _paint_nuclei(tissue: Tissue, rng: np.random.Generator, H: np.ndarray, E: np.ndarray,
                  fine: np.ndarray) -> np.ndarray:
    """Add the nuclei to ``H``/``E`` in place; their instance map (later nuclei win)."""
    h, w = tissue.regions.shape
    um = tissue.um_per_px
    inst = np.zeros((h, w), np.int32)
    coarse = _smooth_noise(rng, (h, w), 1.6)
    cth, sth = np.cos(tissue.theta), np.sin(tissue.theta)
    hsum = np.abs(tissue.harm).sum(axis=(1, 2))
    for i in range(tissue.n):
        cx, cy, a, b = tissue.x[i], tissue.y[i], tissue.a[i], tissue.b[i]
        t = tissue.fine_type[i]
        grow = 2.3 if t == "dead" else (2.0 if t == "melanocyte" else 1 + hsum[i])
        rmax = max(a, b) * grow + 2.5
        x0, x1 = max(int(cx - rmax), 0), min(int(cx + rmax) + 1, w)
        y0, y1 = max(int(cy - rmax), 0), min(int(cy + rmax) + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        r = np.sqrt(dx * dx + dy * dy) + 1e-6
        cd = (dx * cth[i] + dy * sth[i]) / r
        sd = (dy * cth[i] - dx * sth[i]) / r
        R = radius_cs(a, b, tissue.harm[i], cd, sd)
        alpha = np.minimum(np.maximum((R - r) * (1 / 0.9) + 0.5, 0.0), 1.0)
        inside = r <= R
        sl = (slice(y0, y1), slice(x0, x1))
        tex = tissue.texture[i]
        chrom = 1 + tex * (fine[sl] if t != "plasma" else coarse[sl] * 1.3)
        dens = tissue.density[i] * np.maximum(chrom, 0.2)
        ves_ = tissue.vesicular[i]
        if ves_ > 0:
            rel = np.minimum(r / R, 1.0)
            dens = dens * ((1 - 0.55 * ves_) + ves_ * 1.1 * rel ** 4)
        if t == "dead" and tissue.fragmented[i]:
            # karyorrhexis: a few dark fragments instead of one body
            k = int(rng.integers(3, 6))
            frag = np.zeros_like(r)
            for _ in range(k):
                ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 1.4) * max(a, b)
                fx, fy = rad * np.cos(ang), rad * np.sin(ang)
                frag = np.maximum(frag, 1.2 - np.sqrt((dx - fx) ** 2 + (dy - fy) ** 2) * (um / 0.45))
            H[sl] += 1.5 * np.maximum(frag, 0)
            E[sl] += 0.25 * np.maximum(1 - r / (R * 2.2), 0)  # eosinophilic shrunken cytoplasm
        else:
            H[sl] += alpha * dens
            if t == "dead":
                E[sl] += 0.25 * np.maximum(1 - r / (R * 2.2), 0) * (1 - alpha)
        if t == "tumor":  # 1-2 prominent nucleoli
            for _ in range(int(rng.integers(1, 3))):
                ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45) * min(a, b)
                nx, ny = rad * np.cos(ang), rad * np.sin(ang)
                dn = np.sqrt((dx - nx) ** 2 + (dy - ny) ** 2)
                H[sl] += 0.9 * np.minimum(np.maximum(1.2 - dn * (um / 0.55), 0), 1) * alpha
        if t == "melanocyte":  # clear halo
            E[sl] *= np.where((r > R) & (r < R * 1.9), 0.45, 1.0)
        inst[sl][inside] = i + 1
    return inst


def _optical_density_to_rgb(H: np.ndarray, E: np.ndarray, stain: Stain, rng: np.random.Generator, *, um: float,
                            blur_px: float, defocus_px: float, defocus_fraction: float,
                            noise_sd: float) -> np.ndarray:
    """Beer-Lambert RGB of the optical densities, blurred, with defocused patches and noise."""
    h, w = H.shape
    hv = np.asarray(stain.h_vec, np.float32) * stain.h_strength
    ev = np.asarray(stain.e_vec, np.float32) * stain.e_strength
    od = H[..., None] * hv + E[..., None] * ev + 0.025
    if blur_px > 0:
        od = ndi.gaussian_filter(od, (blur_px, blur_px, 0))
    if defocus_fraction > 0 and defocus_px > 0:
        zone = _smooth_noise(rng, (h, w), 60 / um)
        thr = np.quantile(zone, 1 - defocus_fraction)
        wgt = np.clip((zone - thr) / 0.3, 0, 1)[..., None]
        od = od * (1 - wgt) + ndi.gaussian_filter(od, (defocus_px, defocus_px, 0)) * wgt
    rgb = 255.0 * np.power(10.0, -od)
    if noise_sd > 0:
        rgb += rng.normal(0, noise_sd, rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
