"""The true Xenium-µm -> H&E-px map, HEST's imperfect registration, and DAPI outlines.

The true map is an affine (scale ``1 / um_per_px``, a small rotation, an offset) plus a
smooth local displacement given on a coarse grid over Xenium µm and interpolated bilinearly.
The registration handed to users (``he_x/he_y``, ``xenium_seg``, the alignment CSV) is the
true affine composed with an error (shift, rotation, scale about the image centre) and
without the local displacement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["make_transform", "true_he_xy", "true_um_from_he", "apply_affine", "dapi_outlines"]


def apply_affine(A: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3x3 affine (row-major, acting on ``[x, y, 1]``) to coordinate arrays."""
    A = np.asarray(A, dtype=float)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    return A[0, 0] * x + A[0, 1] * y + A[0, 2], A[1, 0] * x + A[1, 1] * y + A[1, 2]


def _bilinear(gx: np.ndarray, gy: np.ndarray, grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``grid[iy, ix]`` at (x, y); constant beyond the grid."""
    x = np.clip(np.asarray(x, dtype=float), gx[0], gx[-1])
    y = np.clip(np.asarray(y, dtype=float), gy[0], gy[-1])
    ix = np.clip(np.searchsorted(gx, x, side="right") - 1, 0, len(gx) - 2)
    iy = np.clip(np.searchsorted(gy, y, side="right") - 1, 0, len(gy) - 2)
    tx = (x - gx[ix]) / (gx[ix + 1] - gx[ix])
    ty = (y - gy[iy]) / (gy[iy + 1] - gy[iy])
    g00, g01 = grid[iy, ix], grid[iy, ix + 1]
    g10, g11 = grid[iy + 1, ix], grid[iy + 1, ix + 1]
    return (g00 * (1 - tx) + g01 * tx) * (1 - ty) + (g10 * (1 - tx) + g11 * tx) * ty


def true_he_xy(transform: dict[str, Any], x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True H&E level-0 pixel coordinates of Xenium µm coordinates.

    Parameters
    ----------
    transform
        The content of ``truth/{id}/transform.json``: ``xenium_um_to_he_px`` (3x3 affine)
        and ``local_displacement`` (grid ``x_um``, ``y_um`` and ``dx_px``, ``dy_px``).
    x_um, y_um
        Xenium coordinates (µm), arrays of equal shape.

    Returns
    -------
    ``(x_px, y_px)``: affine(x) + bilinear displacement(x), arrays of the input shape.
    """
    A = np.asarray(transform["xenium_um_to_he_px"], dtype=float)
    xp, yp = apply_affine(A, x_um, y_um)
    disp = transform.get("local_displacement")
    if disp:
        gx = np.asarray(disp["x_um"], dtype=float)
        gy = np.asarray(disp["y_um"], dtype=float)
        xp = xp + _bilinear(gx, gy, np.asarray(disp["dx_px"], dtype=float), x_um, y_um)
        yp = yp + _bilinear(gx, gy, np.asarray(disp["dy_px"], dtype=float), x_um, y_um)
    return xp, yp


def true_um_from_he(transform: dict[str, Any], x_px: np.ndarray, y_px: np.ndarray,
                    n_iter: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`true_he_xy` (fixed-point iteration; the warp is small and smooth)."""
    A = np.asarray(transform["xenium_um_to_he_px"], dtype=float)
    Ai = np.linalg.inv(A)
    x_px = np.asarray(x_px, dtype=float)
    y_px = np.asarray(y_px, dtype=float)
    xu, yu = apply_affine(Ai, x_px, y_px)
    for _ in range(n_iter):
        fx, fy = true_he_xy(transform, xu, yu)
        ex, ey = x_px - fx, y_px - fy
        dx, dy = Ai[0, 0] * ex + Ai[0, 1] * ey, Ai[1, 0] * ex + Ai[1, 1] * ey
        xu, yu = xu + dx, yu + dy
    return xu, yu


def _rot(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _trans(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def make_transform(rng: np.random.Generator, shape_px: tuple[int, int], um_per_px: float, *,
                   true_rot_deg: float, warp_px: float, warp_grid: int, reg_shift_um: float,
                   reg_rot_deg: float, reg_scale_err: float) -> dict[str, Any]:
    """Draw the true map and HEST's registration of one sample (the transform.json content)."""
    h, w = shape_px
    s = 1.0 / um_per_px
    rot = rng.uniform(-true_rot_deg, true_rot_deg)
    # Xenium origin somewhere up-left of the image: H&E px = R * s * (x_um - origin) + centre
    origin = rng.uniform(200, 2000, 2)
    ext_um = np.array([w, h]) * um_per_px
    c_um = origin + ext_um / 2
    A = _trans(w / 2, h / 2) @ _rot(rot) @ np.diag([s, s, 1.0]) @ _trans(-c_um[0], -c_um[1])
    # local displacement on a grid covering the field (+margin) in Xenium µm
    corners_px = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
    Ai = np.linalg.inv(A)
    cu = np.stack(apply_affine(Ai, corners_px[:, 0], corners_px[:, 1]), 1)
    lo, hi = cu.min(0) - 20, cu.max(0) + 20
    gx = np.linspace(lo[0], hi[0], warp_grid)
    gy = np.linspace(lo[1], hi[1], warp_grid)
    dx = rng.normal(0, warp_px, (warp_grid, warp_grid))
    dy = rng.normal(0, warp_px, (warp_grid, warp_grid))
    # HEST registration error about the image centre
    ang = rng.uniform(0, 2 * np.pi)
    shift_px = reg_shift_um / um_per_px
    sgn = rng.choice([-1.0, 1.0])
    scl = 1.0 + rng.choice([-1.0, 1.0]) * reg_scale_err
    E = _trans(w / 2 + shift_px * np.cos(ang), h / 2 + shift_px * np.sin(ang)) @ _rot(sgn * reg_rot_deg) \
        @ np.diag([scl, scl, 1.0]) @ _trans(-w / 2, -h / 2)
    return {
        "xenium_um_to_he_px": A.tolist(),
        "hest_registration_um_to_he_px": (E @ A).tolist(),
        "local_displacement": {"x_um": gx.tolist(), "y_um": gy.tolist(), "dx_px": dx.tolist(), "dy_px": dy.tolist()},
        "he_um_per_px": um_per_px,
        "true_rotation_deg": float(rot),
        "registration_error": {"shift_um": float(reg_shift_um), "shift_angle_deg": float(np.rad2deg(ang)),
                               "rotation_deg": float(sgn * reg_rot_deg), "scale": float(scl)},
    }


def dapi_outlines(poly_px: np.ndarray, rng: np.random.Generator, *, scale_mean: float, scale_sd: float,
                  shift_px: float, jitter: float, smooth: int = 2) -> np.ndarray:
    """DAPI-like outlines from true nucleus outlines (both ``(n, v, 2)`` in H&E px).

    Each outline is scaled about its centroid (dilation/erosion), shifted, its radii jittered
    (low-pass along the outline, ``smooth`` passes of a 3-tap filter) — the nucleus as the
    DAPI segmentation would see it, IoU ~0.6-0.9 with the H&E nucleus.
    """
    n, v, _ = poly_px.shape
    c = poly_px.mean(axis=1, keepdims=True)
    rel = poly_px - c
    scale = np.clip(rng.normal(scale_mean, scale_sd, (n, 1, 1)), 0.55, 1.6)
    jit = rng.normal(0, jitter, (n, v))
    for _ in range(smooth):
        jit = (np.roll(jit, 1, axis=1) + jit + np.roll(jit, -1, axis=1)) / 3.0
    jit *= np.sqrt(3.0) ** smooth * 0.6
    # a little anisotropy: stretch along a random axis
    ang = rng.uniform(0, np.pi, n)
    st = np.exp(rng.normal(0, 0.06, n))
    u = np.stack([np.cos(ang), np.sin(ang)], 1)[:, None, :]
    along = (rel * u).sum(-1, keepdims=True)
    rel = rel + (st[:, None, None] - 1) * along * u
    rel = rel * scale * (1 + jit[..., None])
    shift = rng.normal(0, shift_px, (n, 1, 2))
    return c + shift + rel
