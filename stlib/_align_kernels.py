"""Compiled and batched helpers of :mod:`stlib.align` for slide-sized alignment.

Why written by hand
-------------------
Scoring a registration measures every tile of a node grid: a 10 x 10 mm slide at 50 µm
spacing has 40,000 nodes, each a Pearson correlation, a Dice and a sub-pixel phase
correlation (:func:`skimage.registration.phase_cross_correlation`) on 100 x 100 px windows,
and the alignment measures the grid seven times. Per-node library calls cost about 1 ms of
Python overhead each, so a slide took over ten minutes. Here the window statistics run as one
compiled pass, and the phase correlations of thousands of windows at once as batched FFTs and
batched matrix products with exactly scikit-image's steps (single precision, the same
upsampled-DFT kernels); :func:`stlib.align._measure` keeps the per-node form as the reference
(``reference=True``), and ``tests/test_align.py`` checks that both give the same shifts and
scores (to float rounding) and the same alignment of the demo cohort.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["hed_h", "window_stats", "gather_windows", "batched_phase_shift", "shifted_peak", "pearson_full",
           "hed_lut"]


def hed_lut() -> tuple[np.ndarray, np.ndarray]:
    """Per-value ``log(max(v / 255, 1e-6)) / log(1e-6)`` (scikit-image's own conversion) and the
    haematoxylin column of ``hed_from_rgb``."""
    from skimage.color.colorconv import hed_from_rgb
    from skimage.util import img_as_float

    v = np.maximum(img_as_float(np.arange(256, dtype=np.uint8)), 1e-6)
    lut = np.log(v) / np.log(1e-6)
    return np.ascontiguousarray(np.stack([lut, lut, lut])), np.ascontiguousarray(hed_from_rgb[:, 0])


@numba.njit(cache=True, nogil=True)
def hed_h(rgb, lut, hcol):  # pragma: no cover - compiled
    """``skimage.color.rgb2hed(rgb)[..., 0].astype(float32)`` of an (H, W, >=3) uint8 block.

    The three-term sum in float64 rounded to float32 equals scikit-image's matrix product
    rounded to float32 (tested on millions of random colours)."""
    H, W = rgb.shape[0], rgb.shape[1]
    h = np.empty((H, W), np.float32)
    for i in range(H):
        for j in range(W):
            v = lut[0, rgb[i, j, 0]] * hcol[0] + lut[1, rgb[i, j, 1]] * hcol[1] + lut[2, rgb[i, j, 2]] * hcol[2]
            h[i, j] = np.float32(v if v > 0.0 else 0.0)
    return h


@numba.njit(cache=True, nogil=True)
def window_stats(h, mask, hmask, u0, v0, n, counts):  # pragma: no cover - compiled
    """Pearson correlation of ``h`` with ``mask`` and Dice of ``hmask`` with ``mask`` in the
    zero-padded ``n x n`` window at each (u0, v0); NaN where ``counts == 0`` (as
    ``align._pearson`` / ``align._dice`` on the windows)."""
    H, W = h.shape
    m = u0.size
    corr = np.full(m, np.nan)
    dice = np.full(m, np.nan)
    N = float(n * n)
    for k in range(m):
        if counts[k] == 0:
            continue
        sa = 0.0
        sb = 0.0
        inter = 0
        sm = 0
        shm = 0
        for i in range(max(0, v0[k]), min(H, v0[k] + n)):
            for j in range(max(0, u0[k]), min(W, u0[k] + n)):
                sa += h[i, j]
                if mask[i, j]:
                    sb += 1.0
                    sm += 1
                    if hmask[i, j]:
                        inter += 1
                if hmask[i, j]:
                    shm += 1
        ma = sa / N
        mb = sb / N
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        inside = 0
        for i in range(max(0, v0[k]), min(H, v0[k] + n)):
            for j in range(max(0, u0[k]), min(W, u0[k] + n)):
                a = h[i, j] - ma
                b = (1.0 if mask[i, j] else 0.0) - mb
                saa += a * a
                sbb += b * b
                sab += a * b
                inside += 1
        out = N - inside  # zero padding: a = -ma, b = -mb
        saa += out * ma * ma
        sbb += out * mb * mb
        sab += out * ma * mb
        d = np.sqrt(saa * sbb)
        corr[k] = sab / d if d > 0 else np.nan
        s = sm + shm
        dice[k] = 2.0 * inter / s if s else np.nan
    return corr, dice


@numba.njit(cache=True, nogil=True)
def gather_windows(arr, u0, v0, n):  # pragma: no cover - compiled
    """(m, n, n) float32 stack of the zero-padded windows at (u0, v0)."""
    H, W = arr.shape
    m = u0.size
    out = np.zeros((m, n, n), np.float32)
    for k in range(m):
        for i in range(max(0, v0[k]), min(H, v0[k] + n)):
            for j in range(max(0, u0[k]), min(W, u0[k] + n)):
                out[k, i - v0[k], j - u0[k]] = arr[i, j]
    return out


def batched_phase_shift(ref: np.ndarray, mov: np.ndarray, upsample: int, workers: int = 1) -> np.ndarray:
    """``phase_cross_correlation(ref[k], mov[k], upsample_factor=upsample, normalization=None)[0]``
    for a stack (m, n, n) of float32 windows, as scikit-image computes it: FFTs, the integer
    peak of the cross-power spectrum's inverse, then the peak of a 1.5-pixel neighbourhood
    upsampled by matrix-multiply DFT, all in single precision."""
    from scipy.fft import fft2, fftfreq, ifft2

    m, n0, n1 = ref.shape
    src = fft2(ref, workers=workers)
    tgt = fft2(mov, workers=workers)
    prod = src * tgt.conj()
    cc = np.abs(ifft2(prod, workers=workers)).reshape(m, -1)
    peak = np.argmax(cc, axis=1)
    shape = np.array([n0, n1])
    shift = np.stack([peak // n1, peak % n1], axis=1).astype(np.float32)
    mid = np.trunc(shape / 2)
    wrap = shift > mid
    shift[wrap] -= np.broadcast_to(shape, shift.shape)[wrap]
    uf = np.float32(upsample)
    shift = np.round(shift * uf) / uf
    ups = int(np.ceil(uf * np.float32(1.5)))
    dftshift = np.trunc(np.float32(ups) / np.float32(2.0))
    offset = dftshift - shift * uf  # (m, 2) float32
    data = prod.conj()
    # _upsampled_dft, last axis first: kernels (m, ups, n) per window
    im2pi = 1j * 2 * np.pi
    ups_size = np.ceil(uf * np.float32(1.5))
    kern = []
    for ax, nn in ((1, n1), (0, n0)):
        k = (np.arange(ups_size)[None, :] - offset[:, ax][:, None])[:, :, None] * fftfreq(nn, uf)[None, None, :]
        kern.append(np.exp(-im2pi * k).astype(data.dtype, copy=False))
    first = np.matmul(kern[0], data.transpose(0, 2, 1))          # (m, ups, n0): axis 1 contracted
    up = np.matmul(kern[1], first.transpose(0, 2, 1)).conj()      # (m, ups0, ups1)
    a = np.abs(up).reshape(m, -1)
    best = np.argmax(a, axis=1)
    mx = np.stack([best // ups, best % ups], axis=1).astype(np.float32) - dftshift
    return shift + mx / uf


@numba.njit(cache=True, nogil=True)
def shifted_peak(h_win, b_win, dv, du):  # pragma: no cover - compiled
    """Pearson correlation, over the interior ``[e:-e]`` (``e = ceil(max |shift|) + 1``), of each
    ``h`` window with its ``b`` window moved by (dv, du) (bilinear, as ``ndimage.shift``
    order 1); ``valid`` is False where the interior is under 8 px (no peak measured)."""
    m, n, _ = h_win.shape
    out = np.full(m, np.nan)
    valid = np.zeros(m, np.bool_)
    for k in range(m):
        e = int(np.ceil(max(abs(du[k]), abs(dv[k])))) + 1
        if n - 2 * e < 8:
            continue
        valid[k] = True
        cnt = 0
        sa = 0.0
        sb = 0.0
        buf = np.empty((n - 2 * e, n - 2 * e))
        for i in range(e, n - e):
            y = i - dv[k]
            y0 = int(np.floor(y))
            fy = y - y0
            for j in range(e, n - e):
                x = j - du[k]
                x0 = int(np.floor(x))
                fx = x - x0
                v = ((1 - fy) * (1 - fx) * b_win[k, y0, x0] + (1 - fy) * fx * b_win[k, y0, x0 + 1]
                     + fy * (1 - fx) * b_win[k, y0 + 1, x0] + fy * fx * b_win[k, y0 + 1, x0 + 1])
                buf[i - e, j - e] = v
                sa += h_win[k, i, j]
                sb += v
                cnt += 1
        ma = sa / cnt
        mb = sb / cnt
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        for i in range(e, n - e):
            for j in range(e, n - e):
                a = h_win[k, i, j] - ma
                b = buf[i - e, j - e] - mb
                saa += a * a
                sbb += b * b
                sab += a * b
        d = np.sqrt(saa * sbb)
        out[k] = sab / d if d > 0 else np.nan
    return out, valid


@numba.njit(cache=True, nogil=True)
def pearson_full(h, mask):  # pragma: no cover - compiled
    """Pearson correlation of a float image with a boolean mask (``align._pearson``)."""
    H, W = h.shape
    N = float(H * W)
    sa = 0.0
    sb = 0.0
    for i in range(H):
        for j in range(W):
            sa += h[i, j]
            sb += 1.0 if mask[i, j] else 0.0
    ma = sa / N
    mb = sb / N
    saa = 0.0
    sbb = 0.0
    sab = 0.0
    for i in range(H):
        for j in range(W):
            a = h[i, j] - ma
            b = (1.0 if mask[i, j] else 0.0) - mb
            saa += a * a
            sbb += b * b
            sab += a * b
    d = np.sqrt(saa * sbb)
    return sab / d if d > 0 else np.nan
