"""Compiled and batched helpers of :mod:`stlib.align` for slide-sized alignment.

Why written by hand
-------------------
Scoring a registration measures every tile of a node grid: a 10 x 10 mm slide at 50 µm
spacing has 40,000 nodes, each a Pearson correlation, a Dice and a sub-pixel phase
correlation (:func:`skimage.registration.phase_cross_correlation`) on 100 x 100 px windows,
and the alignment measures the grid seven times. Per-node library calls cost about 1 ms of
Python overhead each, so a slide took over ten minutes. Here the window statistics run as one
compiled pass, the windows of a batch are cut, centred and Hann-weighted in one compiled pass
(:func:`prep_windows`), their phase correlations run at once with scikit-image's operations
(batched real-input FFTs, the same upsampled-DFT kernels and products: the same shifts to the
upsampling step, nearly all to the last bit), the shifted
peak correlation reads the images in place (:func:`shifted_peak_at`), and the full-image steps
(ring filling, window counts, Gaussian blur, bilinear resampling, colour deconvolution, point
mapping, percentiles, Otsu's histogram) run as compiled or threaded twins of the numpy / scipy /
scikit-image code that give the same arrays. :func:`stlib.align._measure` keeps the per-node
form as the reference (``reference=True``); ``tests/test_fast_paths.py`` checks that both align
the demo cohort the same way (same shifts and exclusions; scores equal to float rounding) and
each kernel against its library form.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["hed_h", "hed_lut", "window_stats", "gather_windows", "batched_phase_shift", "pearson_full",
           "prep_windows", "shifted_peak_at", "global_sums", "pearson_from_sums", "percentile_threaded", "otsu_threaded",
           "fill_rings", "count_in_windows", "gaussian_weights", "gaussian_filter32", "map_linear_nearest", "map_points"]


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
    ``align._pearson`` / ``align._dice`` on the windows).

    One pass per window (:func:`rect_sums`): the sums of ``h``, ``h^2``, ``mask``, ``h * mask``
    (float64), from which the centred sums follow (``sum (a - ma)^2 = sum a^2 - (sum a)^2 / N``,
    the padding counted as zeros); equal to the two-pass form to float rounding."""
    H, W = h.shape
    m = u0.size
    corr = np.full(m, np.nan)
    dice = np.full(m, np.nan)
    N = float(n * n)
    for k in range(m):
        if counts[k] == 0:
            continue
        s = rect_sums(h, mask, hmask, max(0, v0[k]), min(H, v0[k] + n), max(0, u0[k]), min(W, u0[k] + n))
        corr[k] = pearson_from_sums(s, N)
        t = s[2] + s[4]
        dice[k] = 2.0 * s[5] / t if t else np.nan
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
    for a stack (m, n, n) of float32 windows, computed with scikit-image's operations except one:
    the windows are real, so the cross-power spectrum is taken from real-input FFTs (``rfft2``,
    half the spectrum, about half the work of the complex ``fft2`` scikit-image runs) and the
    cross-correlation from ``irfft2``; the full spectrum the upsampled DFT needs is the half and
    its Hermitian mirror. Then, as scikit-image: the integer peak of the cross-correlation, the
    upsampled-DFT kernels of all windows at once (elementwise, the same formula and precision)
    and the same complex products for the peak of the 1.5-pixel neighbourhood upsampled
    ``upsample`` times. The real-input transforms round differently in the last bits, so on a
    near-tie a peak may move to the neighbouring upsampled position: the shifts agree with
    scikit-image's to ``1 / upsample`` px (``tests/test_fast_paths.py``).
    """
    from scipy.fft import fftfreq, irfft2, rfft2

    m, n0, n1 = ref.shape
    src = rfft2(ref, workers=workers)
    tgt = rfft2(mov, workers=workers)
    half = src * tgt.conj()  # (m, n0, n1 // 2 + 1): the non-negative frequencies of the last axis
    cc = np.abs(irfft2(half, s=(n0, n1), workers=workers)).reshape(m, -1)
    peak = np.argmax(cc, axis=1)
    shape = np.array([n0, n1])
    shift = np.stack([peak // n1, peak % n1], axis=1).astype(np.float32)
    mid = np.trunc(shape / 2)
    wrap = shift > mid
    shift[wrap] -= np.broadcast_to(shape, shift.shape)[wrap]
    uf = np.array(upsample, dtype=np.float32)
    shift = np.round(shift * uf) / uf
    ups_size = np.ceil(uf * 1.5)
    dftshift = np.trunc(ups_size / 2.0)
    offset = dftshift - shift * uf  # (m, 2) float32
    # data = conj(cross-power spectrum) over the whole plane: the computed half, and for the
    # negative frequencies of the last axis the mirror conj(X[-k0, -k1]) of the half (Hermitian)
    data = hermitian_full(half, n1)
    ar = np.arange(ups_size)
    kern = []
    for ax, nn in ((1, n1), (0, n0)):  # _upsampled_dft: the last axis first
        # a kernel depends on the window only through its offset, which takes a few values
        # (integer shifts): computed once per value, with the same expression
        vals, inv = np.unique(offset[:, ax], return_inverse=True)
        kern.append(_dft_kernels(vals, ar, nn, uf, data.dtype)[inv.ravel()])
    ups = int(ups_size)
    # tensordot(kernel, data, axes=(1, -1)) per window is dot(kernel, data.T): the same BLAS
    # product as a stacked matmul with transposed views (bit-identical, checked in the tests)
    d = np.matmul(kern[0], data.transpose(0, 2, 1))
    d = np.matmul(kern[1], d.transpose(0, 2, 1))
    best = np.argmax(np.abs(d.conj()).reshape(m, -1), axis=1)
    mx = np.stack([best // ups, best % ups], axis=1).astype(np.float32) - dftshift
    return shift + mx / uf


# upsampled-DFT kernels by (offset, size, upsampling, dtype): the same few offsets recur in every
# batch of every measurement of a slide (a kernel is 30 x n complex exponentials, computed in
# complex128; with many distinct offsets in a batch that was up to a third of its time)
_DFT_KERNELS: dict[tuple[float, int, float, int, str], np.ndarray] = {}
_DFT_KERNELS_MAX = 2048  # about 50 MB of 100-px kernels


def _dft_kernels(vals: np.ndarray, ar: np.ndarray, nn: int, uf: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``exp(-2j pi (ar - v) fftfreq(nn, uf))`` (scikit-image's ``_upsampled_dft`` kernel) as
    ``dtype`` for each offset value ``v`` of ``vals``, shape (vals.size, ar.size, nn); each
    value's kernel computed once per process with the same elementwise expression (the same
    numbers as computing it in a batch)."""
    from scipy.fft import fftfreq

    dt = np.dtype(dtype)
    keys = [(float(v), int(nn), float(uf), int(ar.size), dt.str) for v in vals]
    out = np.empty((vals.size, ar.size, nn), dt)
    miss = []
    for i, key in enumerate(keys):
        hit = _DFT_KERNELS.get(key)
        if hit is None:
            miss.append(i)
        else:
            out[i] = hit
    if miss:
        vm = vals[miss]
        k = (ar[None, :] - vm[:, None])[:, :, None] * fftfreq(nn, uf)[None, None, :]
        im2pi = 1j * 2 * np.pi
        new = np.exp(-im2pi * k).astype(dt, copy=False)
        if len(_DFT_KERNELS) + len(miss) > _DFT_KERNELS_MAX:
            _DFT_KERNELS.clear()
        for j, i in enumerate(miss):
            out[i] = new[j]
            _DFT_KERNELS[keys[i]] = out[i].copy()
    return out


@numba.njit(cache=True, nogil=True)
def hermitian_full(half, n1):  # pragma: no cover - compiled
    """The whole (m, n0, n1) plane ``conj(X)`` of real-input spectra ``X`` given as their
    non-negative last-axis half (m, n0, n1 // 2 + 1): the half conjugated, and the negative
    frequencies from the Hermitian mirror ``conj(X[-k0, -k1]) = X[k0, k1]``, i.e. column
    ``n1 - k1`` of row ``-k0 mod n0`` of the half taken as it is. Element copies and sign
    flips only (exact); one pass instead of numpy's three strided copies."""
    m, n0, nh = half.shape
    data = np.empty((m, n0, n1), half.dtype)
    for k in range(m):
        for i in range(n0):
            si = (n0 - i) % n0
            for j in range(nh):
                data[k, i, j] = np.conj(half[k, i, j])
            for j in range(nh, n1):
                data[k, i, j] = half[k, si, n1 - j]
    return data


@numba.njit(cache=True, nogil=True)
def prep_windows(h, b, u0, v0, n, hann):  # pragma: no cover - compiled
    """The inputs of the phase correlation of each window: the zero-padded ``n x n`` windows
    of ``h`` and ``b`` at (u0, v0), minus their means, times ``hann`` (float32, as
    ``(w - w.mean()) * hann`` with the mean summed in float64), and whether both are non-zero."""
    H, W = h.shape
    m = u0.size
    ref = np.zeros((m, n, n), np.float32)
    mov = np.zeros((m, n, n), np.float32)
    ok = np.zeros(m, np.bool_)
    for k in range(m):
        i0, i1 = max(0, v0[k]), min(H, v0[k] + n)
        j0, j1 = max(0, u0[k]), min(W, u0[k] + n)
        sa = 0.0
        sb = 0.0
        for i in range(i0, i1):
            for j in range(j0, j1):
                sa += h[i, j]
                sb += b[i, j]
        ma = np.float32(sa / (n * n))
        mb = np.float32(sb / (n * n))
        # outside the image the window is 0: (0 - mean) * hann
        for i in range(n):
            for j in range(n):
                ref[k, i, j] = (np.float32(0.0) - ma) * hann[i, j]
                mov[k, i, j] = (np.float32(0.0) - mb) * hann[i, j]
        for i in range(i0, i1):
            wi = i - v0[k]
            for j in range(j0, j1):
                wj = j - u0[k]
                ref[k, wi, wj] = (h[i, j] - ma) * hann[wi, wj]
                mov[k, wi, wj] = (b[i, j] - mb) * hann[wi, wj]
        nza = False
        nzb = False
        for i in range(n):
            for j in range(n):
                nza = nza or ref[k, i, j] != 0
                nzb = nzb or mov[k, i, j] != 0
            if nza and nzb:
                break
        ok[k] = nza and nzb
    return ref, mov, ok


@numba.njit(cache=True, nogil=True)
def shifted_peak_at(h, b, u0, v0, n, dv, du):  # pragma: no cover - compiled
    """Pearson correlation, over the interior ``[e:-e]`` (``e = ceil(max |shift|) + 1``), of each
    zero-padded ``n x n`` window of ``h`` at (u0, v0) with the same window of ``b`` moved by
    (dv, du) (bilinear, as ``ndimage.shift`` order 1); ``valid`` is False where the interior is
    under 8 px (no peak measured). Read from the images themselves (no gathered copies); the
    bilinear weights of a shift are the same for every pixel of a window, so they are computed
    once per window, and the correlation is summed in one pass (float64). Equal to the reference
    path's ``ndimage.shift`` + ``_pearson`` to float rounding (tests)."""
    H, W = h.shape
    m = u0.size
    out = np.full(m, np.nan)
    valid = np.zeros(m, np.bool_)
    for k in range(m):
        e = int(np.ceil(max(abs(du[k]), abs(dv[k])))) + 1
        if n - 2 * e < 8:
            continue
        valid[k] = True
        # sample position of window pixel (i, j): (i - dv, j - du) = (i + oy + fy, j + ox + fx)
        oy = int(np.floor(-dv[k]))
        ox = int(np.floor(-du[k]))
        fy = -dv[k] - oy
        fx = -du[k] - ox
        w00, w01 = (1 - fy) * (1 - fx), (1 - fy) * fx
        w10, w11 = fy * (1 - fx), fy * fx
        # rows / columns of the image read (interior e..n-e plus the bilinear neighbour)
        r0, r1 = v0[k] + e + min(oy, 0), v0[k] + n - e + max(oy + 1, 0)
        c0, c1 = u0[k] + e + min(ox, 0), u0[k] + n - e + max(ox + 1, 0)
        inside = r0 >= 0 and c0 >= 0 and r1 <= H and c1 <= W
        sa = 0.0
        sb = 0.0
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        for i in range(e, n - e):
            y = v0[k] + i
            for j in range(e, n - e):
                x = u0[k] + j
                if inside:
                    a = np.float64(h[y, x])
                    v = (w00 * b[y + oy, x + ox] + w01 * b[y + oy, x + ox + 1]
                         + w10 * b[y + oy + 1, x + ox] + w11 * b[y + oy + 1, x + ox + 1])
                else:
                    a = np.float64(_padded(h, y, x))
                    v = (w00 * _padded(b, y + oy, x + ox) + w01 * _padded(b, y + oy, x + ox + 1)
                         + w10 * _padded(b, y + oy + 1, x + ox) + w11 * _padded(b, y + oy + 1, x + ox + 1))
                sa += a
                sb += v
                saa += a * a
                sbb += v * v
                sab += a * v
        cnt = (n - 2 * e) * (n - 2 * e)
        vaa = saa - sa * sa / cnt
        vbb = sbb - sb * sb / cnt
        vab = sab - sa * sb / cnt
        d = np.sqrt(vaa * vbb) if vaa > 0 and vbb > 0 else 0.0
        out[k] = vab / d if d > 0 else np.nan
    return out, valid


@numba.njit(cache=True, nogil=True, inline="always")
def _padded(img, y, x):  # pragma: no cover - compiled
    """``img[y, x]``, 0 outside the image (a zero-padded window's pixel)."""
    if 0 <= y < img.shape[0] and 0 <= x < img.shape[1]:
        return img[y, x]
    return np.float32(0.0)


@numba.njit(cache=True, nogil=True)
def pearson_full(h, mask):  # pragma: no cover - compiled
    """Pearson correlation of a float image with a boolean mask (``align._pearson``)."""
    sums = global_sums(h, mask, mask, 0, h.shape[0])
    return pearson_from_sums(sums, float(h.size))


@numba.njit(cache=True, nogil=True)
def global_sums(h, mask, hmask, r0, r1):  # pragma: no cover - compiled
    """Rows ``r0:r1``: :func:`rect_sums` over the whole width (the global Pearson correlation
    and Dice, one pass)."""
    return rect_sums(h, mask, hmask, r0, r1, 0, h.shape[1])


@numba.njit(cache=True, nogil=True)
def rect_sums(h, mask, hmask, i0, i1, j0, j1):  # pragma: no cover - compiled
    """Over rows ``i0:i1`` and columns ``j0:j1``: sums of ``h``, ``h^2``, ``mask``, ``h * mask``
    (float64) and the counts of ``hmask`` and ``hmask & mask``."""
    out = np.zeros(6)
    sa = 0.0
    saa = 0.0
    sab = 0.0
    sm = 0
    shm = 0
    inter = 0
    for i in range(i0, i1):
        for j in range(j0, j1):
            a = np.float64(h[i, j])
            sa += a
            saa += a * a
            if mask[i, j]:
                sab += a
                sm += 1
                if hmask[i, j]:
                    inter += 1
            if hmask[i, j]:
                shm += 1
    out[0], out[1], out[2], out[3], out[4], out[5] = sa, saa, sm, sab, shm, inter
    return out


@numba.njit(cache=True, nogil=True)
def pearson_from_sums(s, N):  # pragma: no cover - compiled
    """The Pearson correlation of :func:`rect_sums`' totals over ``N`` pixels (the padding counted
    as zeros). A centred sum of squares under 1e-12 of its raw sum counts as zero (a constant
    image: no correlation)."""
    vaa = s[1] - s[0] * s[0] / N
    vbb = s[2] - s[2] * s[2] / N
    vab = s[3] - s[0] * s[2] / N
    if vaa <= 1e-12 * s[1]:
        vaa = 0.0
    d = np.sqrt(vaa * vbb)
    return vab / d if d > 0 else np.nan


# --------------------------------------------------------------------------------------
# full-image steps of a measurement, as exact twins of the numpy / scipy forms
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def ring_crossings(xy, ring, H, W):  # pragma: no cover - compiled
    """The first half of :func:`fill_rings`: the signed edge crossings of each pixel row
    (``(H, W + 1)`` int16, summed along a row they give the winding number)."""
    acc = np.zeros((H, W + 1), np.int16)
    n = xy.shape[0]
    if n < 2 or H == 0 or W == 0:
        return acc
    n_ring = 0
    for k in range(n):
        n_ring = max(n_ring, ring[k] + 1)
    area2 = np.zeros(n_ring)
    for k in range(n - 1):
        if ring[k + 1] == ring[k]:
            area2[ring[k]] += xy[k, 0] * xy[k + 1, 1] - xy[k + 1, 0] * xy[k, 1]
    for k in range(n - 1):
        if ring[k + 1] != ring[k]:
            continue
        o = area2[ring[k]]
        orient = 1.0 if o > 0 else (-1.0 if o < 0 else 0.0)
        if orient == 0.0:
            continue
        x0, y0, x1, y1 = xy[k, 0], xy[k, 1], xy[k + 1, 0], xy[k + 1, 1]
        r0 = min(max(np.ceil(min(y0, y1)), 0.0), float(H))
        r1 = min(max(np.ceil(max(y0, y1)), 0.0), float(H))
        sign = (-1.0 if y1 > y0 else 1.0) * orient
        for r in range(int(r0), int(r1)):
            t = (r - y0) / (y1 - y0)
            xc = x0 + t * (x1 - x0)
            c = int(min(max(np.ceil(xc), 0.0), float(W)))
            acc[r, c] += np.int16(sign)
    return acc


@numba.njit(cache=True, nogil=True)
def fill_rows(acc, out, outf, r0, r1):  # pragma: no cover - compiled
    """The second half of :func:`fill_rings` for rows ``r0:r1``: a pixel is inside where the
    running winding number is non-zero; ``out`` (bool) and ``outf`` (the same as float32)."""
    W = out.shape[1]
    for r in range(r0, r1):
        w = 0
        for c in range(W):
            w += acc[r, c]
            v = abs(w) > 0
            out[r, c] = v
            outf[r, c] = 1.0 if v else 0.0


@numba.njit(cache=True, nogil=True)
def fill_rings(xy, ring, H, W):  # pragma: no cover - compiled
    """``align._rasterize_rings``: pixel centres inside the rings (non-zero winding after
    orienting every ring the same way), with the same crossing arithmetic."""
    out = np.zeros((H, W), np.bool_)
    if xy.shape[0] < 2 or H == 0 or W == 0:
        return out
    outf = np.empty((H, W), np.float32)
    fill_rows(ring_crossings(xy, ring, H, W), out, outf, 0, H)
    return out


def fill_rings_threaded(xy: np.ndarray, ring: np.ndarray, H: int, W: int,
                        workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fill_rings` and the same mask as float32, the row pass split over ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.zeros((H, W), np.bool_)
    outf = np.zeros((H, W), np.float32)
    if xy.shape[0] < 2 or H == 0 or W == 0:
        return out, outf
    acc = ring_crossings(xy, ring, H, W)
    edges = np.linspace(0, H, 4 * max(1, workers) + 1).astype(int)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda k: fill_rows(acc, out, outf, edges[k], edges[k + 1]), range(edges.size - 1)))
    return out, outf


@numba.njit(cache=True, nogil=True)
def count_in_windows(iu, iv, H, W, u0, v0, win):  # pragma: no cover - compiled
    """``align._count_window``: points (rounded work px, inside the image) in each window
    ``[u0, u0 + win) x [v0, v0 + win)`` clipped to the image, via buckets of the window size."""
    nbx = W // win + 1
    nby = H // win + 1
    cnt = np.zeros(nbx * nby + 1, np.int64)
    for k in range(iu.size):
        if 0 <= iu[k] < W and 0 <= iv[k] < H:
            cnt[(iv[k] // win) * nbx + iu[k] // win + 1] += 1
    for b in range(nbx * nby):
        cnt[b + 1] += cnt[b]
    pos = cnt.copy()
    pu = np.empty(cnt[-1], np.int64)
    pv = np.empty(cnt[-1], np.int64)
    for k in range(iu.size):
        if 0 <= iu[k] < W and 0 <= iv[k] < H:
            b = (iv[k] // win) * nbx + iu[k] // win
            pu[pos[b]] = iu[k]
            pv[pos[b]] = iv[k]
            pos[b] += 1
    out = np.zeros(u0.size, np.int64)
    for w in range(u0.size):
        a0, a1 = min(max(u0[w], 0), W), min(max(u0[w] + win, 0), W)
        b0, b1 = min(max(v0[w], 0), H), min(max(v0[w] + win, 0), H)
        if a1 <= a0 or b1 <= b0:
            continue
        for by in range(b0 // win, (b1 - 1) // win + 1):
            for bx in range(a0 // win, (a1 - 1) // win + 1):
                b = by * nbx + bx
                for k in range(cnt[b], cnt[b + 1]):
                    if a0 <= pu[k] < a1 and b0 <= pv[k] < b1:
                        out[w] += 1
    return out


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D kernel of :func:`scipy.ndimage.gaussian_filter` (same formula, same radius)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return (phi / phi.sum())[::-1].copy()


@numba.njit(cache=True, nogil=True)
def reflect(k, n):  # pragma: no cover - compiled
    """scipy.ndimage 'reflect' (half-sample symmetric) index of one overhang (k in [-n, 2n))."""
    if k < 0:
        return -k - 1
    if k >= n:
        return 2 * n - k - 1
    return k


@numba.njit(cache=True, nogil=True)
def correlate1d_sym(src, w, axis, out, r0, r1):  # pragma: no cover - compiled
    """Rows ``r0:r1`` of ``ndimage.correlate1d(src, w, axis, mode="reflect")`` for a symmetric
    kernel, float64 accumulation rounded to ``out``'s float32; per pixel the sum runs as in
    scipy's symmetric branch: centre term, then the outermost pair inwards."""
    H, W = src.shape
    r = (w.shape[0] - 1) // 2
    if axis == 0:
        acc = np.empty(W, np.float64)
        for i in range(r0, r1):
            for j in range(W):
                acc[j] = np.float64(src[i, j]) * w[r]
            for q in range(r, 0, -1):
                a = reflect(i - q, H)
                b = reflect(i + q, H)
                wq = w[r - q]
                for j in range(W):
                    acc[j] += (np.float64(src[a, j]) + np.float64(src[b, j])) * wq
            for j in range(W):
                out[i, j] = np.float32(acc[j])
        return
    buf = np.empty(W + 2 * r, np.float64)
    for i in range(r0, r1):
        for k in range(W + 2 * r):
            buf[k] = src[i, reflect(k - r, W)]
        for j in range(W):
            c = j + r
            a = buf[c] * w[r]
            for q in range(r, 0, -1):
                a += (buf[c - q] + buf[c + q]) * w[r - q]
            out[i, j] = np.float32(a)


def gaussian_filter32(img: np.ndarray, sigma: float, workers: int = 1) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(img, sigma)`` of a 2-D float32 image (bit-identical),
    rows split over ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ascontiguousarray(img, dtype=np.float32)
    if sigma <= 0:
        return src.copy()
    w = gaussian_weights(sigma)
    if (w.size - 1) // 2 >= min(src.shape):  # multiple reflections: leave it to scipy
        from scipy import ndimage

        return ndimage.gaussian_filter(src, sigma)
    tmp = np.empty_like(src)
    out = np.empty_like(src)
    H = src.shape[0]
    step = max(1, -(-H // (4 * max(1, workers))))
    spans = [(a, min(H, a + step)) for a in range(0, H, step)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda s: correlate1d_sym(src, w, 0, tmp, s[0], s[1]), spans))
        list(pool.map(lambda s: correlate1d_sym(tmp, w, 1, out, s[0], s[1]), spans))
    return out


@numba.njit(cache=True, nogil=True)
def map_linear_nearest(img, jy, jx):  # pragma: no cover - compiled
    """``ndimage.map_coordinates(img, meshgrid(jy, jx), order=1, mode="nearest")`` of a 2-D
    float32 image on a separable grid (coordinates clamped to the image, then bilinear)."""
    H, W = img.shape
    out = np.empty((jy.size, jx.size), np.float32)
    for i in range(jy.size):
        cy = min(max(jy[i], 0.0), H - 1.0)
        y0 = int(np.floor(cy))
        ty = cy - y0
        y1 = min(y0 + 1, H - 1)
        for j in range(jx.size):
            cx = min(max(jx[j], 0.0), W - 1.0)
            x0 = int(np.floor(cx))
            tx = cx - x0
            x1 = min(x0 + 1, W - 1)
            t = 0.0
            t += np.float64(img[y0, x0]) * (1.0 - ty) * (1.0 - tx)
            t += np.float64(img[y0, x1]) * (1.0 - ty) * tx
            t += np.float64(img[y1, x0]) * ty * (1.0 - tx)
            t += np.float64(img[y1, x1]) * ty * tx
            out[i, j] = np.float32(t)
    return out


@numba.njit(cache=True, nogil=True)
def _axis_pos(g, v):  # pragma: no cover - compiled
    """``align._bilinear``'s cell index and fraction of ``v`` on the increasing grid ``g``."""
    n = g.size
    if n == 1:
        return 0, 0.0
    vc = min(max(v, g[0]), g[n - 1])
    lo, hi = 0, n  # searchsorted(g, vc, side="right")
    while lo < hi:
        mid = (lo + hi) // 2
        if g[mid] <= vc:
            lo = mid + 1
        else:
            hi = mid
    i = min(max(lo - 1, 0), n - 2)
    return i, (vc - g[i]) / (g[i + 1] - g[i])


@numba.njit(cache=True, nogil=True)
def _transform_point(x, y, A, gx, gy, dxg, dyg, has_grid):  # pragma: no cover - compiled
    """One point through ``Transform.apply_xy``: affine ``A``, then (``has_grid``) the bilinear
    displacement grid (axes ``gx``, ``gy``; shifts ``dxg``, ``dyg``), the same arithmetic."""
    px = A[0, 0] * x + A[0, 1] * y + A[0, 2]
    py = A[1, 0] * x + A[1, 1] * y + A[1, 2]
    if has_grid:
        ix, tx = _axis_pos(gx, x)
        iy, ty = _axis_pos(gy, y)
        ix1 = min(ix + 1, gx.size - 1)
        iy1 = min(iy + 1, gy.size - 1)
        px = px + (dxg[iy, ix] * (1 - tx) * (1 - ty) + dxg[iy, ix1] * tx * (1 - ty)
                   + dxg[iy1, ix] * (1 - tx) * ty + dxg[iy1, ix1] * tx * ty)
        py = py + (dyg[iy, ix] * (1 - tx) * (1 - ty) + dyg[iy, ix1] * tx * (1 - ty)
                   + dyg[iy1, ix] * (1 - tx) * ty + dyg[iy1, ix1] * tx * ty)
    return px, py


@numba.njit(cache=True, nogil=True)
def map_points(xy, A, gx, gy, dxg, dyg, has_grid, x0, y0, f):  # pragma: no cover - compiled
    """``grid.xy_to_work(T.apply_xy(xy))`` for a :class:`stlib.align.Transform` (affine
    ``A`` plus the bilinear displacement grid) and a work grid (``x0, y0, f``), same arithmetic."""
    out = np.empty((xy.shape[0], 2))
    map_points_rows(xy, A, gx, gy, dxg, dyg, has_grid, x0, y0, f, out, 0, xy.shape[0])
    return out


@numba.njit(cache=True, nogil=True)
def map_points_rows(xy, A, gx, gy, dxg, dyg, has_grid, x0, y0, f, out, k0, k1):  # pragma: no cover - compiled
    """Rows ``k0:k1`` of :func:`map_points` into ``out``."""
    for k in range(k0, k1):
        x = xy[k, 0]
        y = xy[k, 1]
        px, py = _transform_point(x, y, A, gx, gy, dxg, dyg, has_grid)
        out[k, 0] = (px - x0 + 0.5) / f - 0.5
        out[k, 1] = (py - y0 + 0.5) / f - 0.5


@numba.njit(cache=True, nogil=True)
def neighbour_outliers(dx, dy, ok, thresh):  # pragma: no cover - compiled
    """``align._neighbour_outliers``: nodes whose shift differs by more than ``thresh`` from the
    median shift of their reliable 3 x 3 neighbours (at least two), the same medians (the middle
    value, or the mean of the two middle values, as ``np.median``) and distance."""
    ny, nx = dx.shape
    out = np.zeros((ny, nx), np.bool_)
    bx = np.empty(8)
    by = np.empty(8)
    for j in range(ny):
        for i in range(nx):
            if not ok[j, i]:
                continue
            m = 0
            for a in range(max(0, j - 1), min(ny, j + 2)):
                for b in range(max(0, i - 1), min(nx, i + 2)):
                    if ok[a, b] and not (a == j and b == i):
                        bx[m] = dx[a, b]
                        by[m] = dy[a, b]
                        m += 1
            if m < 2:
                continue
            sx = np.sort(bx[:m])
            sy = np.sort(by[:m])
            h = m // 2
            mx = sx[h] if m % 2 else (sx[h - 1] + sx[h]) / 2.0
            my = sy[h] if m % 2 else (sy[h - 1] + sy[h]) / 2.0
            if np.hypot(dx[j, i] - mx, dy[j, i] - my) > thresh:
                out[j, i] = True
    return out


@numba.njit(cache=True, nogil=True)
def apply_transform(xy, A, gx, gy, dxg, dyg, has_grid, out, k0, k1):  # pragma: no cover - compiled
    """Rows ``k0:k1`` of ``Transform.apply_xy(xy)`` (affine ``A`` plus the bilinear displacement
    grid) into ``out``: :func:`map_points` without the work grid, the same arithmetic."""
    for k in range(k0, k1):
        x = xy[k, 0]
        y = xy[k, 1]
        px, py = _transform_point(x, y, A, gx, gy, dxg, dyg, has_grid)
        out[k, 0] = px
        out[k, 1] = py


# --------------------------------------------------------------------------------------
# order statistics and histograms of a whole working image, split over threads
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _bin_counts(a, mn, scale, nb):  # pragma: no cover - compiled
    """Counts of ``a`` (1-D) in ``nb`` equal bins from ``mn`` (``bin = int((v - mn) * scale)``,
    clipped; monotone in ``v``) and the number of NaNs."""
    counts = np.zeros(nb, np.int64)
    nan = 0
    for k in range(a.size):
        v = a[k]
        if v != v:
            nan += 1
            continue
        b = int((np.float64(v) - mn) * scale)
        counts[min(max(b, 0), nb - 1)] += 1
    return counts, nan


@numba.njit(cache=True, nogil=True)
def _bin_values(a, mn, scale, nb, want):  # pragma: no cover - compiled
    """The values of ``a`` whose bin (as :func:`_bin_counts`) is marked in ``want``."""
    n = 0
    for k in range(a.size):
        b = min(max(int((np.float64(a[k]) - mn) * scale), 0), nb - 1)
        if want[b]:
            n += 1
    out = np.empty(n, a.dtype)
    n = 0
    for k in range(a.size):
        b = min(max(int((np.float64(a[k]) - mn) * scale), 0), nb - 1)
        if want[b]:
            out[n] = a[k]
            n += 1
    return out


def percentile_threaded(a: np.ndarray, q: Sequence[float], workers: int = 1, nbins: int = 1 << 16) -> np.ndarray:
    """``np.percentile(a, q)`` (method "linear", the same float64 numbers) of a large float
    array, the selection split over ``workers`` threads.

    The order statistics numpy interpolates between are found exactly by selection through a
    histogram: counts in ``nbins`` value bins (a monotone binning, so the k-th smallest value
    lies in the bin where the cumulative count passes k), then a partition of the few values
    in the bins that hold the wanted ranks. The interpolation is numpy's ``_lerp``, written out
    with the same operations. NaNs or quantiles at the ends fall back to ``np.percentile``.
    """
    from concurrent.futures import ThreadPoolExecutor

    flat = np.ascontiguousarray(a).reshape(-1)
    N = flat.size
    quantiles = np.true_divide(np.asanyarray(q, dtype=float), 100)
    virtual = (N - 1) * quantiles
    if N < 2 or np.any(virtual < 0) or np.any(virtual >= N - 1) or flat.dtype.kind != "f":
        return np.percentile(a, q)
    parts = np.array_split(flat, max(1, 2 * workers))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        mins = list(pool.map(np.min, parts))
        maxs = list(pool.map(np.max, parts))
        mn, mx = float(min(mins)), float(max(maxs))
        if not (np.isfinite(mn) and np.isfinite(mx)):
            return np.percentile(a, q)
        scale = (nbins - 1) / (mx - mn) if mx > mn else 0.0
        res = list(pool.map(lambda p: _bin_counts(p, mn, scale, nbins), parts))
        if sum(r[1] for r in res):
            return np.percentile(a, q)
        cum = np.cumsum(sum(r[0] for r in res))
        prev = np.floor(virtual).astype(np.intp)
        ranks = np.unique(np.concatenate([prev, prev + 1]))
        bins = np.searchsorted(cum, ranks, side="right")  # bin of the rank-th smallest value
        want = np.zeros(nbins, np.bool_)
        want[bins] = True
        chunks = list(pool.map(lambda p: _bin_values(p, mn, scale, nbins, want), parts))
    vals = np.concatenate(chunks)
    # the values of the wanted bins, in bin order, start at rank cum[bin] - count[bin] each
    vb = np.minimum((np.maximum(vals.astype(np.float64) - mn, 0) * scale).astype(np.int64), nbins - 1) \
        if scale else np.zeros(vals.size, np.int64)
    got = {}
    for r, b in zip(ranks, bins):
        inbin = vals[vb == b]
        start = int(cum[b - 1]) if b > 0 else 0
        got[int(r)] = np.partition(inbin, r - start)[r - start]
    lo = np.array([got[int(r)] for r in prev], dtype=flat.dtype)
    hi = np.array([got[int(r) + 1] for r in prev], dtype=flat.dtype)
    gamma = np.asanyarray(virtual - prev)
    diff = hi - lo
    out = np.add(lo, diff * gamma)
    np.subtract(hi, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return out


def otsu_threaded(img: np.ndarray, workers: int = 1) -> float:
    """``skimage.filters.threshold_otsu(img)`` (256 bins over the image's range) with the
    histogram counted over ``workers`` threads: ``np.histogram`` of row blocks with the
    image's own range gives every pixel the same bin, and the summed counts are handed to
    scikit-image's ``threshold_otsu(hist=...)``. The image must not be constant."""
    from concurrent.futures import ThreadPoolExecutor

    from skimage.filters import threshold_otsu

    flat = np.ascontiguousarray(img).reshape(-1)
    parts = np.array_split(flat, max(1, 4 * workers))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        mn = min(pool.map(np.min, parts))
        mx = max(pool.map(np.max, parts))
        hists = list(pool.map(lambda p: np.histogram(p, bins=256, range=(mn, mx)), parts))
    counts = sum(h[0] for h in hists)
    edges = hists[0][1]
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0)))
