"""Compiled kernels of the mask refinement (:mod:`stlib.labels.refine`): GIL-free twins of library calls.

Why written by hand
-------------------
The refinement runs once per 256-px training tile, about 25,000 tiles per 10 x 10 mm slide.
The library calls it is composed of (scikit-image ``rgb2hed``, ``sobel``, ``watershed``; scipy
``gaussian_filter``, ``distance_transform_edt``, ``median`` with labels, binary fill-holes /
opening / ``label`` per nucleus) each spend 1-12 ms per tile in general-purpose code and
per-call overhead, and they hold the GIL, so tiles cannot be refined in threads. Each kernel
below computes **the same numbers** as its library twin on a small 2-D tile: same arithmetic
(order of the floating-point sums, float32 rounding where the library rounds), same tie rules
(the watershed's priority queue, the feature transform's nearest-pixel choice, the
components' numbering). ``tests/test_refine.py`` compares every kernel with the library on
random and tie-heavy inputs, and the whole refinement with the reference implementation
(:func:`stlib.labels.refine.refine_instances_reference`).

Only what the refinement needs is implemented: 2-D arrays, ``mode="reflect"`` borders,
4-connectivity, no sampling, no masks.
"""

from __future__ import annotations

import numba
import numpy as np

from stlib._align_kernels import gaussian_weights, hed_h, hed_lut, reflect

__all__ = ["hed_lut", "haematoxylin_smoothed", "gaussian_weights", "edt_owner", "edt_distance", "beyond",
           "label_median", "sobel_magnitude", "watershed", "clean_labels"]


# --------------------------------------------------------------------------------------
# haematoxylin optical density (skimage.color.rgb2hed channel 0), then Gaussian smoothing
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def haematoxylin_smoothed(rgb, lut, hcol, w):  # pragma: no cover - compiled
    """``gaussian_filter(rgb2hed(rgb)[..., 0].astype(float32), sigma)`` (``w``: :func:`gaussian_weights`;
    :func:`hed_h` is :mod:`stlib._align_kernels`' twin of ``rgb2hed``).

    The two passes are ``correlate1d_sym`` of :mod:`stlib._align_kernels` (scipy's symmetric
    branch: float64 sum of the centre term, then the pairs from the outermost inwards, rounded
    to float32) with the loops turned so that the innermost one runs along a row for both axes
    (the same sums in the same order per pixel; about a third faster on 256-px tiles).
    """
    h = hed_h(rgb, lut, hcol)
    if w.shape[0] <= 1:
        return h
    H, W = h.shape
    r = (w.shape[0] - 1) // 2
    tmp = np.empty((H, W), np.float32)
    acc = np.empty(W, np.float64)
    wr = w[r]
    for i in range(H):  # axis 0: whole rows at a time
        for j in range(W):
            acc[j] = np.float64(h[i, j]) * wr
        for q in range(r, 0, -1):
            up = h[reflect(i - q, H)]
            down = h[reflect(i + q, H)]
            wq = w[r - q]
            for j in range(W):
                acc[j] += (np.float64(up[j]) + np.float64(down[j])) * wq
        for j in range(W):
            tmp[i, j] = np.float32(acc[j])
    buf = np.empty(W + 2 * r, np.float64)
    for i in range(H):  # axis 1: the reflected row padded once, then one tap at a time along it
        for k in range(W + 2 * r):
            buf[k] = tmp[i, reflect(k - r, W)]
        mid = buf[r:r + W]  # slices, so that the compiler knows the indices are in range and vectorises
        for j in range(W):
            acc[j] = mid[j] * wr
        for q in range(r, 0, -1):
            wq = w[r - q]
            left = buf[r - q:r - q + W]
            right = buf[r + q:r + q + W]
            for j in range(W):
                acc[j] += (left[j] + right[j]) * wq
        for j in range(W):
            h[i, j] = np.float32(acc[j])
    return h


# --------------------------------------------------------------------------------------
# exact Euclidean distance / feature transform (scipy.ndimage.distance_transform_edt)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _feature_transform(feature):  # pragma: no cover - compiled
    """Nearest feature pixel (row, col) of every pixel, with scipy's tie rules.

    Maurer's separable algorithm as ``ndimage.distance_transform_edt`` runs it: first along
    axis 0 (nearest feature in the column; of two at equal distance the upper one), then along
    axis 1 on the lower envelope of the column candidates (a candidate is dropped only when
    strictly hidden; of two at equal distance the left one). -1 where there is no feature.
    """
    H, W = feature.shape
    ftr = np.empty((H, W), np.int32)
    ftc = np.empty((H, W), np.int32)
    up = np.empty(H, np.int64)
    for j in range(W):
        last = -1
        for i in range(H):
            if feature[i, j]:
                last = i
            up[i] = last
        nxt = -1
        for i in range(H - 1, -1, -1):
            if feature[i, j]:
                nxt = i
            u = up[i]
            if u >= 0 and (nxt < 0 or i - u <= nxt - i):
                ftr[i, j] = u
            else:
                ftr[i, j] = nxt
    g = np.empty(W, np.int64)
    fr = np.empty(W, np.int64)
    for i in range(H):
        top = -1
        for jj in range(W):
            fr[jj] = ftr[i, jj]
            if fr[jj] < 0:
                continue
            t = float(fr[jj] - i)
            wr = t * t
            while top >= 1:
                i1 = g[top]
                i2 = g[top - 1]
                a = float(i1 - i2)
                b = float(jj - i1)
                tu = float(fr[i2] - i)
                tv = float(fr[i1] - i)
                c = a + b
                if c * (tv * tv) - b * (tu * tu) - a * wr - a * b * c <= 0.0:
                    break
                top -= 1
            top += 1
            g[top] = jj
        if top < 0:
            for jj in range(W):
                ftr[i, jj] = -1
                ftc[i, jj] = -1
            continue
        k = 0
        for jj in range(W):
            q = g[k]
            t0 = float(q - jj)
            t1 = float(fr[q] - i)
            d1 = t0 * t0 + t1 * t1
            while k < top:
                q = g[k + 1]
                t0 = float(q - jj)
                t1 = float(fr[q] - i)
                d2 = t0 * t0 + t1 * t1
                if d1 <= d2:
                    break
                d1 = d2
                k += 1
            q = g[k]
            ftr[i, jj] = fr[q]
            ftc[i, jj] = q
    return ftr, ftc


@numba.njit(cache=True, nogil=True)
def edt_owner(local):  # pragma: no cover - compiled
    """``dist, (iy, ix) = distance_transform_edt(local == 0, return_indices=True)``; returns
    ``dist`` (float64) and ``local[iy, ix]`` (the label of the nearest labelled pixel)."""
    H, W = local.shape
    ftr, ftc = _feature_transform(local != 0)
    dist = np.empty((H, W), np.float64)
    owner = np.empty((H, W), local.dtype)
    for i in range(H):
        for j in range(W):
            dr = float(ftr[i, j] - i)
            dc = float(ftc[i, j] - j)
            dist[i, j] = np.sqrt(dr * dr + dc * dc)
            owner[i, j] = local[ftr[i, j], ftc[i, j]]
    return dist, owner


@numba.njit(cache=True, nogil=True)
def edt_distance(mask):  # pragma: no cover - compiled
    """``distance_transform_edt(mask)`` (distance of each True pixel to the nearest False one)."""
    H, W = mask.shape
    ftr, ftc = _feature_transform(~mask)
    dist = np.empty((H, W), np.float64)
    for i in range(H):
        for j in range(W):
            dr = float(ftr[i, j] - i)
            dc = float(ftc[i, j] - j)
            dist[i, j] = np.sqrt(dr * dr + dc * dc)
    return dist


@numba.njit(cache=True, nogil=True)
def beyond(mask, radius):  # pragma: no cover - compiled
    """``distance_transform_edt(mask) > radius`` without the full transform: a True pixel is kept
    when no False pixel of the image lies within ``radius``. Per row, the squared column distance
    to the nearest False pixel of the row; per pixel, the smallest ``hd2[i + dy, j] + dy^2`` over
    the rows within ``radius`` (a row-wise minimum the compiler vectorises), compared with the
    largest integer ``d2`` whose float ``sqrt`` is ``<= radius`` (:func:`_sqrt_le`)."""
    H, W = mask.shape
    t = _sqrt_le(radius)
    big = np.int32(t + 1)  # no False pixel in the row (or too far): never within radius
    hd2 = np.empty((H, W), np.int32)
    for i in range(H):
        last = -1
        for j in range(W):
            if not mask[i, j]:
                last = j
            hd2[i, j] = j - last if last >= 0 else -1
        nxt = -1
        for j in range(W - 1, -1, -1):
            if not mask[i, j]:
                nxt = j
            d = hd2[i, j]
            if nxt >= 0 and (d < 0 or nxt - j < d):
                d = nxt - j
            hd2[i, j] = big if (d < 0 or d * d > t) else d * d
    R = 0
    while (R + 1) * (R + 1) <= t:
        R += 1
    out = np.zeros((H, W), np.bool_)
    best = np.empty(W, np.int32)
    for i in range(H):
        best[:] = big
        for dy in range(-R, R + 1):
            a = i + dy
            if a < 0 or a >= H:
                continue
            c = np.int32(dy * dy)
            row = hd2[a]
            for j in range(W):
                v = row[j] + c
                if v < best[j]:
                    best[j] = v
        for j in range(W):
            out[i, j] = mask[i, j] and best[j] > t
    return out


# --------------------------------------------------------------------------------------
# label statistics
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def label_median(values, labels, n):  # pragma: no cover - compiled
    """Median of float32 ``values`` per label 1..n (NaN without pixels), as ``ndimage.median``:
    the middle value, or the float32 mean of the two middle values."""
    cnt = np.zeros(n + 2, np.int64)
    H, W = labels.shape
    for i in range(H):
        for j in range(W):
            lab = labels[i, j]
            if 0 < lab <= n:
                cnt[lab + 1] += 1
    for k in range(1, n + 2):
        cnt[k] += cnt[k - 1]
    pos = cnt.copy()
    buf = np.empty(cnt[n + 1], np.float32)
    for i in range(H):
        for j in range(W):
            lab = labels[i, j]
            if 0 < lab <= n:
                buf[pos[lab]] = values[i, j]
                pos[lab] += 1
    med = np.full(n + 1, np.nan)
    for lab in range(1, n + 1):
        a, b = cnt[lab], cnt[lab + 1]
        if b == a:
            continue
        seg = buf[a:b]  # this label's values, reordered in place by the selection
        m = b - a
        lo = (m - 1) // 2
        hi = m - 1 - lo
        vhi = _kth(seg, hi)  # the order statistics a sort would give (values only, no sort)
        vlo = vhi
        if lo != hi:  # lo = hi - 1: the largest of the hi smallest values, seg[:hi]
            vlo = seg[0]
            for t in range(1, hi):
                vlo = max(vlo, seg[t])
        med[lab] = np.float32(np.float32(vlo + vhi) / np.float32(2.0))
    return med


# --------------------------------------------------------------------------------------
# Sobel magnitude (skimage.filters.sobel of a float32 image)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def sobel_magnitude(img):  # pragma: no cover - compiled
    """``skimage.filters.sobel(img)`` for 2-D float32: two ``ndimage.convolve`` passes (float64
    sums over the non-zero weights in raster order), squared, summed, ``sqrt(.) / sqrt(2)`` in float32."""
    return sobel_where(img, np.ones(img.shape, np.bool_))


@numba.njit(cache=True, nogil=True)
def sobel_where(img, need):  # pragma: no cover - compiled
    """:func:`sobel_magnitude` at the pixels where ``need`` is True (the same values), 0 elsewhere."""
    H, W = img.shape
    out = np.zeros((H, W), np.float32)
    s2 = np.sqrt(np.float32(2.0))
    for i in range(H):
        im = reflect(i - 1, H)
        ip = reflect(i + 1, H)
        for j in range(W):
            if not need[i, j]:
                continue
            jm = reflect(j - 1, W)
            jp = reflect(j + 1, W)
            a = 0.0
            a += np.float64(img[im, jm]) * -0.25
            a += np.float64(img[im, j]) * -0.5
            a += np.float64(img[im, jp]) * -0.25
            a += np.float64(img[ip, jm]) * 0.25
            a += np.float64(img[ip, j]) * 0.5
            a += np.float64(img[ip, jp]) * 0.25
            b = 0.0
            b += np.float64(img[im, jm]) * -0.25
            b += np.float64(img[im, jp]) * 0.25
            b += np.float64(img[i, jm]) * -0.5
            b += np.float64(img[i, jp]) * 0.5
            b += np.float64(img[ip, jm]) * -0.25
            b += np.float64(img[ip, jp]) * 0.25
            ga = np.float32(a)
            gb = np.float32(b)
            acc = np.float32(np.float32(0.0) + np.float32(ga * ga))
            acc = np.float32(acc + np.float32(gb * gb))
            out[i, j] = np.float32(np.float32(np.sqrt(acc)) / s2)
    return out


# --------------------------------------------------------------------------------------
# marker watershed (skimage.segmentation.watershed, connectivity 1, no compactness)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _smaller(hv, ha, a, b):  # pragma: no cover - compiled
    if hv[a] != hv[b]:
        return hv[a] < hv[b]
    return ha[a] < ha[b]


@numba.njit(cache=True, nogil=True)
def _swap(hv, ha, hi, a, b):  # pragma: no cover - compiled
    hv[a], hv[b] = hv[b], hv[a]
    ha[a], ha[b] = ha[b], ha[a]
    hi[a], hi[b] = hi[b], hi[a]


@numba.njit(cache=True, nogil=True)
def _push(hv, ha, hi, n, v, a, p):  # pragma: no cover - compiled
    hv[n] = v
    ha[n] = a
    hi[n] = p
    c = n
    while c > 0:
        par = (c + 1) // 2 - 1
        if _smaller(hv, ha, c, par):
            _swap(hv, ha, hi, c, par)
            c = par
        else:
            break
    return n + 1


@numba.njit(cache=True, nogil=True)
def _pop(hv, ha, hi, n):  # pragma: no cover - compiled
    n -= 1
    if n > 0:
        _swap(hv, ha, hi, 0, n)
        i = 0
        sm = 0
        while True:
            lft = 2 * i + 1
            rgt = 2 * i + 2
            if lft < n:
                if _smaller(hv, ha, lft, i):
                    sm = lft
                if rgt < n and _smaller(hv, ha, rgt, sm):
                    sm = rgt
            else:
                break
            if sm == i:
                break
            _swap(hv, ha, hi, i, sm)
            i = sm
    return n


@numba.njit(cache=True, nogil=True)
def _sorted_seeds(img, out, seed):  # pragma: no cover - compiled
    """Seed markers by value (raster order among equal values) and the groups of equal value
    holding more than one label ("mixed ties"): positions of their first member and sizes
    (:func:`_watershed` finds the same groups from its ranks; the tests count tie cases with this)."""
    idx = np.flatnonzero(seed)
    vals = np.empty(idx.size, np.float32)
    for i in range(idx.size):
        v = np.float32(img[idx[i]])
        vals[i] = v if v != 0 else np.float32(0.0)
    idx = idx[_stable_order(vals)]
    starts = []
    sizes = []
    k = 0
    while k < idx.size:
        e = k + 1
        mixed = False
        while e < idx.size and img[idx[e]] == img[idx[k]]:
            mixed = mixed or out[idx[e]] != out[idx[k]]
            e += 1
        if mixed:
            starts.append(k)
            sizes.append(e - k)
        k = e
    return idx, np.array(starts, np.int64), np.array(sizes, np.int64)


@numba.njit(cache=True, nogil=True)
def _flood_exact(img, out, inside, offs, cap):  # pragma: no cover - compiled
    """scikit-image's flooding: every marker in one binary heap (its tie order for equal keys)."""
    hv = np.empty(cap, np.float64)
    ha = np.empty(cap, np.int64)
    hi = np.empty(cap, np.int64)
    n = 0
    for p in range(out.size):
        if out[p] != 0:
            n = _push(hv, ha, hi, n, img[p], 0, p)
    age = 1
    while n > 0:
        p = hi[0]
        pv = hv[0]
        n = _pop(hv, ha, hi, n)
        for k in range(4):
            q = p + offs[k]
            if not inside[q] or out[q] != 0:
                continue
            age += 1
            out[q] = out[p]
            n = _push(hv, ha, hi, n, img[q] if img[q] >= pv else pv, age, q)  # at least the parent's cost


@numba.njit(cache=True, nogil=True)
def _float_keys(vals):  # pragma: no cover - compiled
    """Order-preserving unsigned 32-bit keys of float32 values."""
    bits = vals.view(np.uint32)
    key = np.empty(vals.size, np.uint32)
    for i in range(vals.size):
        b = bits[i]
        key[i] = ~b if b & np.uint32(0x80000000) else b | np.uint32(0x80000000)
    return key


@numba.njit(cache=True, nogil=True)
def _radix_order(key):  # pragma: no cover - compiled
    """Stable ascending order of uint32 keys: an LSD radix sort, three 11-bit passes (the keys
    are moved with their positions, so every pass reads sequentially)."""
    m = key.size
    k1 = key.copy()
    i1 = np.arange(m).astype(np.int32)
    k2 = np.empty(m, np.uint32)
    i2 = np.empty(m, np.int32)
    cnt = np.empty(2049, np.int64)
    for shift in (0, 11, 22):
        cnt[:] = 0
        for i in range(m):
            cnt[((k1[i] >> shift) & 0x7FF) + 1] += 1
        for d in range(2048):
            cnt[d + 1] += cnt[d]
        for i in range(m):
            d = (k1[i] >> shift) & 0x7FF
            c = cnt[d]
            k2[c] = k1[i]
            i2[c] = i1[i]
            cnt[d] = c + 1
        k1, k2 = k2, k1
        i1, i2 = i2, i1
    return i1.astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _stable_order(vals):  # pragma: no cover - compiled
    """``np.argsort(vals, kind="stable")`` for float32 values without NaN or -0.0."""
    return _radix_order(_float_keys(vals))


@numba.njit(cache=True, nogil=True)
def _dense_ranks(vals):  # pragma: no cover - compiled
    """Rank of each float32 value among the distinct values (0 = smallest)."""
    m = vals.size
    key = _float_keys(vals)
    order = _radix_order(key)
    rank = np.empty(m, np.int64)
    r = -1
    for i in range(m):
        if i == 0 or key[order[i]] != key[order[i - 1]]:
            r += 1
        rank[order[i]] = r
    return rank, r + 1


@numba.njit(cache=True, nogil=True)
def watershed(image, markers):  # pragma: no cover - compiled
    """``skimage.segmentation.watershed(image, markers)`` for 2-D float32 ``image`` (:func:`_watershed`)."""
    return _watershed(image, markers, np.empty((0, 0), np.float32))


@numba.njit(cache=True, nogil=True)
def _watershed(image, markers, h_exact):  # pragma: no cover - compiled
    """``skimage.segmentation.watershed(image, markers)`` for 2-D float32 ``image`` and
    non-negative ``markers``.

    scikit-image floods from all marker pixels with a binary heap ordered by (value, age):
    markers enter in raster order with age 0, a pixel is labelled when it is pushed, with the
    larger of its own value and its parent's and the next age, 4-neighbours in the order up,
    left, right, down. Here, markers without an unlabelled neighbour (they never push a pixel)
    are left out and the queue is a bucket queue (:func:`_flood_ranked`): the seeds enter their
    buckets in raster order, which within a bucket (one value) is the heap's order. Every key is
    distinct except ties between markers of one label, whose order cannot change a label, so
    the labels are scikit-image's. When markers of different labels tie in value the heap's
    own tie order could matter: for one or two tied pairs both orders of each pair are tried
    and, if the labels agree, taken; otherwise all markers go into one binary heap exactly as in
    scikit-image (:func:`_flood_exact`).

    The bucket queue reads ``image`` only at the seeds and the unlabelled pixels; the binary
    heap reads it at every marker. When ``h_exact`` is not empty, ``image`` may hold values only
    at the unlabelled pixels and their 4-neighbours, and the heap path floods
    ``sobel_magnitude(h_exact)`` instead (the full image).
    """
    H, W = image.shape
    W2 = W + 2
    size = (H + 2) * W2
    out = np.full(size, -1, np.int32)  # -1: a frame around the image that is never flooded
    for i in range(H):
        for j in range(W):
            out[(i + 1) * W2 + j + 1] = markers[i, j]
    offs = np.array([-W2, -1, 1, W2])
    # one raster pass: the seeds (markers with an unlabelled 4-neighbour) and the unlabelled
    # pixels, with their values (-0.0 as 0.0: they compare equal, one key)
    cand = np.empty(H * W, np.int64)
    vals = np.empty(H * W, np.float32)
    seed = np.empty(H * W, np.bool_)
    m = 0
    nmark = 0
    for i in range(H):
        base = (i + 1) * W2 + 1
        for j in range(W):
            p = base + j
            o = out[p]
            if o != 0:
                nmark += 1
                if not (out[p - W2] == 0 or out[p - 1] == 0 or out[p + 1] == 0 or out[p + W2] == 0):
                    continue
            v = np.float32(image[i, j])
            cand[m] = p
            vals[m] = v if v != 0 else np.float32(0.0)
            seed[m] = o != 0
            m += 1
    rk, nb = _dense_ranks(vals[:m])
    rank = np.empty(size, np.int32)  # read only at the candidates
    nseed = 0
    for k in range(m):
        rank[cand[k]] = rk[k]
        nseed += seed[k]
    seeds = np.empty(nseed, np.int64)  # raster order
    # per value: its seeds, the first two of them and whether they hold more than one label
    cnt = np.zeros(nb, np.int64)
    first = np.empty(nb, np.int64)
    second = np.empty(nb, np.int64)
    mixed = np.zeros(nb, np.bool_)
    t = 0
    for k in range(m):
        if seed[k]:
            p = cand[k]
            b = rk[k]
            if cnt[b] == 0:
                first[b] = t
            else:
                if cnt[b] == 1:
                    second[b] = t
                if out[p] != out[seeds[first[b]]]:
                    mixed[b] = True
            cnt[b] += 1
            seeds[t] = p
            t += 1
    groups = 0
    pairs = True
    for b in range(nb):
        if mixed[b]:
            groups += 1
            pairs = pairs and cnt[b] == 2
    if groups == 0:
        _flood_ranked(out, offs, rank, nb, seeds)
    elif groups <= 2 and pairs:
        # one or two tied pairs: the heap pops each pair in one of its two orders; when every
        # combination gives the same labels, that is the heap's result too
        ga = np.empty(groups, np.int64)
        gb = np.empty(groups, np.int64)
        g = 0
        for b in range(nb):
            if mixed[b]:
                ga[g] = first[b]
                gb[g] = second[b]
                g += 1
        ref = out.copy()
        _flood_ranked(ref, offs, rank, nb, seeds)
        agree = True
        for combo in range(1, 1 << groups):
            sw = seeds.copy()
            for g in range(groups):
                if combo >> g & 1:
                    sw[ga[g]], sw[gb[g]] = sw[gb[g]], sw[ga[g]]
            alt = out.copy()
            _flood_ranked(alt, offs, rank, nb, sw)
            if not np.array_equal(alt, ref):
                agree = False
                break
        if agree:
            out[:] = ref
        else:
            _heap_path(image, h_exact, out, offs, nmark + H * W + 1)
    else:
        _heap_path(image, h_exact, out, offs, nmark + H * W + 1)
    res = np.empty((H, W), np.int32)
    for i in range(H):
        for j in range(W):
            res[i, j] = out[(i + 1) * W2 + j + 1]
    return res


@numba.njit(cache=True, nogil=True, inline="always")
def _enqueue(head, tail, nxt, b, p):  # pragma: no cover - compiled
    """Append pixel ``p`` to FIFO bucket ``b`` of :func:`_flood_ranked`'s linked-list queue."""
    nxt[p] = -1
    if head[b] < 0:
        head[b] = p
    else:
        nxt[tail[b]] = p
    tail[b] = p


@numba.njit(cache=True, nogil=True)
def _flood_ranked(out, offs, rank, nb, seeds):  # pragma: no cover - compiled
    """The bucket-queue flooding of :func:`_watershed`: the pushed values are ``max(own,
    parent's)``, never below the value being popped (a monotone queue), and all of them are
    values of seeds or unlabelled pixels, ranked once (``rank``, ``nb`` distinct values); each
    rank is a FIFO bucket. Within a bucket the seeds (age 0, in the order given) come first and
    then the pixels in push (= age) order, which is the (value, age) order of the heap.
    ``out`` is the framed label image (frame -1, unlabelled 0), flooded in place."""
    head = np.full(nb, -1, np.int32)
    tail = np.empty(nb, np.int32)  # read only where head is set
    nxt = np.empty(out.size, np.int32)  # set when a pixel is queued
    for p in seeds:
        _enqueue(head, tail, nxt, rank[p], p)
    cur = 0
    while cur < nb:
        p = head[cur]
        if p < 0:
            cur += 1
            continue
        head[cur] = nxt[p]
        for k in range(4):
            q = p + offs[k]
            if out[q] != 0:  # labelled, or the frame
                continue
            out[q] = out[p]
            _enqueue(head, tail, nxt, rank[q] if rank[q] > cur else cur, q)  # at least the parent's cost


@numba.njit(cache=True, nogil=True)
def _heap_path(image, h_exact, out, offs, cap):  # pragma: no cover - compiled
    """:func:`_flood_exact` on the framed label image ``out`` of :func:`_watershed` (in place):
    the frame as 0 outside ``inside``, the padded flat image from ``image`` or ``h_exact``."""
    H, W = image.shape
    W2 = W + 2
    img = np.zeros(out.size, np.float64)
    inside = np.zeros(out.size, np.bool_)
    for i in range(H):
        for j in range(W):
            p = (i + 1) * W2 + j + 1
            img[p] = image[i, j]
            inside[p] = True
    for p in range(out.size):
        if not inside[p]:
            out[p] = 0
    _flood_exact(_full_padded(img, h_exact), out, inside, offs, cap)


@numba.njit(cache=True, nogil=True)
def _full_padded(img, h_exact):  # pragma: no cover - compiled
    """The padded flat image of :func:`_watershed`: ``img`` itself, or ``sobel_magnitude(h_exact)``."""
    if h_exact.size == 0:
        return img
    H, W = h_exact.shape
    g = sobel_magnitude(h_exact)
    full = np.zeros(img.size, np.float64)
    for i in range(H):
        for j in range(W):
            full[(i + 1) * (W + 2) + j + 1] = g[i, j]
    return full


# --------------------------------------------------------------------------------------
# per-label clean-up (refine._clean: fill holes, open by one pixel, keep the core component)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _bboxes(lab, n):  # pragma: no cover - compiled
    H, W = lab.shape
    bb = np.empty((n + 1, 4), np.int64)
    for k in range(n + 1):
        bb[k, 0] = H
        bb[k, 1] = -1
        bb[k, 2] = W
        bb[k, 3] = -1
    for i in range(H):
        for j in range(W):
            k = lab[i, j]
            if 0 < k <= n:
                bb[k, 0] = min(bb[k, 0], i)
                bb[k, 1] = max(bb[k, 1], i + 1)
                bb[k, 2] = min(bb[k, 2], j)
                bb[k, 3] = max(bb[k, 3], j + 1)
    return bb


@numba.njit(cache=True, nogil=True)
def _fill_holes(m):  # pragma: no cover - compiled
    """ndimage.binary_fill_holes (4-connected background reached from the border stays)."""
    h, w = m.shape
    outside = np.zeros((h, w), np.bool_)
    stack = np.empty(h * w, np.int64)
    top = 0
    for i in range(h):
        for j in range(w):
            if (i == 0 or j == 0 or i == h - 1 or j == w - 1) and not m[i, j]:
                outside[i, j] = True
                stack[top] = i * w + j
                top += 1
    while top > 0:
        top -= 1
        p = stack[top]
        i, j = p // w, p % w
        for di, dj in ((-1, 0), (0, -1), (0, 1), (1, 0)):
            a, b = i + di, j + dj
            if 0 <= a < h and 0 <= b < w and not m[a, b] and not outside[a, b]:
                outside[a, b] = True
                stack[top] = a * w + b
                top += 1
    return ~outside


@numba.njit(cache=True, nogil=True)
def _open_cross(m):  # pragma: no cover - compiled
    """ndimage.binary_opening with the 4-neighbour cross, border value 0."""
    h, w = m.shape
    er = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            er[i, j] = (m[i, j] and i > 0 and m[i - 1, j] and i < h - 1 and m[i + 1, j]
                        and j > 0 and m[i, j - 1] and j < w - 1 and m[i, j + 1])
    op = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            op[i, j] = (er[i, j] or (i > 0 and er[i - 1, j]) or (i < h - 1 and er[i + 1, j])
                        or (j > 0 and er[i, j - 1]) or (j < w - 1 and er[i, j + 1]))
    return op


@numba.njit(cache=True, nogil=True)
def _components(m):  # pragma: no cover - compiled
    """ndimage.label with the cross: components numbered by their first pixel in raster order."""
    h, w = m.shape
    cc = np.zeros((h, w), np.int64)
    stack = np.empty(h * w, np.int64)
    k = 0
    for i0 in range(h):
        for j0 in range(w):
            if not m[i0, j0] or cc[i0, j0] != 0:
                continue
            k += 1
            cc[i0, j0] = k
            top = 1
            stack[0] = i0 * w + j0
            while top > 0:
                top -= 1
                p = stack[top]
                i, j = p // w, p % w
                for di, dj in ((-1, 0), (0, -1), (0, 1), (1, 0)):
                    a, b = i + di, j + dj
                    if 0 <= a < h and 0 <= b < w and m[a, b] and cc[a, b] == 0:
                        cc[a, b] = k
                        stack[top] = a * w + b
                        top += 1
    return cc, k


@numba.njit(cache=True, nogil=True)
def clean_labels(lab, core, n):  # pragma: no cover - compiled
    """Per label 1..n (in order): fill holes, open by one pixel (unless that empties it), keep the
    component with most core pixels (else the largest); earlier labels keep contested pixels."""
    out = np.zeros(lab.shape, lab.dtype)
    bb = _bboxes(lab, n)
    for lbl in range(1, n + 1):
        r0, r1, c0, c1 = bb[lbl, 0], bb[lbl, 1], bb[lbl, 2], bb[lbl, 3]
        if r1 < 0:
            continue
        m = lab[r0:r1, c0:c1] == lbl
        m = _fill_holes(m)
        op = _open_cross(m)
        if op.any():
            m = op
        cc, k = _components(m)
        if k == 0:
            continue
        hits = np.zeros(k + 1, np.int64)
        size = np.zeros(k + 1, np.int64)
        for i in range(r1 - r0):
            for j in range(c1 - c0):
                size[cc[i, j]] += 1
                if core[r0 + i, c0 + j] == lbl:
                    hits[cc[i, j]] += 1
        hits[0] = 0
        keep = 0
        if hits.max() > 0:
            keep = int(np.argmax(hits))
        else:
            keep = int(np.argmax(size[1:])) + 1
        for i in range(r1 - r0):
            for j in range(c1 - c0):
                if cc[i, j] == keep and out[r0 + i, c0 + j] == 0:
                    out[r0 + i, c0 + j] = lbl
    return out


# --------------------------------------------------------------------------------------
# fused steps of refine_instances (the numpy glue of the reference, without temporaries)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def same_label_interior(local):  # pragma: no cover - compiled
    """Pixels whose 4-neighbours (inside the tile) carry the same non-zero label."""
    H, W = local.shape
    m = np.empty((H, W), np.bool_)
    for i in range(H):
        for j in range(W):
            v = local[i, j]
            m[i, j] = (v > 0 and (i == 0 or local[i - 1, j] == v) and (i == H - 1 or local[i + 1, j] == v)
                       and (j == 0 or local[i, j - 1] == v) and (j == W - 1 or local[i, j + 1] == v))
    return m


@numba.njit(cache=True, nogil=True)
def _sqrt_le(r):  # pragma: no cover - compiled
    """The largest integer d2 >= -1 with ``sqrt(float(d2)) <= r`` (-1 when r < 0)."""
    if r < 0:
        return -1
    d2 = int(r * r) + 2
    while d2 >= 0 and np.sqrt(float(d2)) > r:
        d2 -= 1
    return d2


@numba.njit(cache=True, nogil=True)
def _near_ring_full(local, t_near, t_ring):  # pragma: no cover - compiled
    """``near``, ``ring`` and ``outside`` of :func:`zones` from the full feature transform."""
    H, W = local.shape
    ftr, ftc = _feature_transform(local != 0)
    near = np.zeros((H, W), np.int32)
    ring = np.zeros((H, W), np.int32)
    outside = np.zeros((H, W), np.bool_)
    for i in range(H):
        for j in range(W):
            dr = ftr[i, j] - i
            dc = ftc[i, j] - j
            d2 = dr * dr + dc * dc
            o = local[ftr[i, j], ftc[i, j]]
            if d2 <= t_near:
                near[i, j] = o
            elif d2 <= t_ring:
                ring[i, j] = o
            outside[i, j] = o == 0 or d2 > t_near
    return near, ring, outside


@numba.njit(cache=True, nogil=True)
def _near_ring(local, t_near, t_ring, shift):  # pragma: no cover - compiled
    """:func:`_near_ring_full` computed only up to the squared distance ``t_ring`` (same arrays).

    Which labelled pixel :func:`_feature_transform` (scipy's) picks as the nearest: per column
    the nearest labelled row (the upper one of two at equal distance), and of the columns' picks
    at the smallest distance the leftmost (Maurer's lower envelope drops only candidates that are
    strictly farther everywhere, and its scan stops at the first of equal ones). Only columns
    within ``sqrt(t_ring)`` can hold a pick that near, so each row takes the minimum over
    ``2 sqrt(t_ring) + 1`` shifted copies of a key ``(d2 << shift) + column`` (smallest
    distance, then leftmost column), a loop the compiler vectorises. Beyond ``t_ring`` a pixel is
    ``outside`` whoever owns it. Tested against :func:`_near_ring_full`.
    """
    H, W = local.shape
    # column pass, row by row: fr = the nearest labelled row in the column (the upper one on a tie)
    fr = np.empty((H, W), np.int32)
    for j in range(W):
        fr[0, j] = 0 if local[0, j] != 0 else -1
    for i in range(1, H):
        for j in range(W):
            fr[i, j] = i if local[i, j] != 0 else fr[i - 1, j]
    below = np.full(W, -1, np.int32)
    for i in range(H - 1, -1, -1):
        for j in range(W):
            if local[i, j] != 0:
                below[j] = i
            u = fr[i, j]
            d = below[j]
            fr[i, j] = u if (u >= 0 and (d < 0 or i - u <= d - i)) else d
    R = 0
    while (R + 1) * (R + 1) <= t_ring:
        R += 1
    far = np.int32((t_ring + 1) << shift)  # any key >= far is beyond t_ring
    mask = (1 << shift) - 1
    near = np.zeros((H, W), np.int32)
    ring = np.zeros((H, W), np.int32)
    outside = np.ones((H, W), np.bool_)
    key = np.empty(W, np.int32)
    best = np.empty(W, np.int32)
    for i in range(H):
        some = False
        for j in range(W):
            f = fr[i, j]
            d2 = (f - i) * (f - i)
            if f >= 0 and d2 <= t_ring:
                key[j] = np.int32((d2 << shift) + j)
                some = True
            else:
                key[j] = far
        if not some:
            continue
        best[:] = far
        for dj in range(-R, R + 1):
            lo = max(0, -dj)
            hi = min(W, W - dj)
            c = np.int32((dj * dj) << shift)
            b = best[lo:hi]  # slices: indices the compiler knows are in range, so the loop vectorises
            k = key[lo + dj:hi + dj]
            for t in range(hi - lo):
                v = k[t] + c
                if v < b[t]:
                    b[t] = v
        for j in range(W):
            v = best[j]
            d2 = v >> shift
            if d2 > t_ring:
                continue
            col = v & mask
            o = local[fr[i, col], col]
            if d2 <= t_near:
                near[i, j] = o
                outside[i, j] = o == 0
            else:
                ring[i, j] = o
    return near, ring, outside


@numba.njit(cache=True, nogil=True)
def zones(local, interior, n, r, rr, rc):  # pragma: no cover - compiled
    """``near`` (owner within ``r``), ``ring`` (owner in ``(r, r + rr]``), ``outside``
    (farther than ``r``) and ``core`` (labels farther than ``rc`` from their edge; a label
    without such pixels keeps its whole mask) of :func:`stlib.labels.refine.refine_instances`."""
    H, W = local.shape
    # squared distances are integers: the largest ones with sqrt(d2) <= r (and <= r + rr), found
    # with the same float sqrt as the reference, decide exactly as comparing sqrt(d2)
    t_near = _sqrt_le(r)
    t_ring = _sqrt_le(r + rr)
    shift = 0
    while (1 << shift) < W:
        shift += 1
    if ((2 * t_ring + 2) << shift) < 2 ** 30:
        near, ring, outside = _near_ring(local, t_near, t_ring, shift)
    else:  # pragma: no cover - zones wider than any tile: the full feature transform
        near, ring, outside = _near_ring_full(local, t_near, t_ring)
    deep = beyond(interior, rc)
    core = np.zeros((H, W), np.int32)
    has_core = np.zeros(n + 1, np.bool_)
    for i in range(H):
        for j in range(W):
            if deep[i, j]:
                core[i, j] = local[i, j]
                has_core[local[i, j]] = True
    for i in range(H):
        for j in range(W):
            v = local[i, j]
            if v > 0 and not has_core[v]:  # thinner than the erosion: the whole mask is the core
                core[i, j] = v
    return near, ring, outside, core


@numba.njit(cache=True, nogil=True)
def masked_median(values, mask):  # pragma: no cover - compiled
    """``np.median(values[mask])`` for float32 values (NaN when empty)."""
    m = 0
    for v in mask.ravel():
        m += v
    if m == 0:
        return np.nan
    buf = np.empty(m, np.float32)
    k = 0
    fv = values.ravel()
    fm = mask.ravel()
    for i in range(fv.size):
        if fm[i]:
            buf[k] = fv[i]
            k += 1
    half = m // 2
    hi = _kth(buf, half)
    if m % 2:
        return float(hi)
    lo = buf[0]
    for i in range(1, half):  # after the selection, buf[:half] holds the smaller values
        lo = max(lo, buf[i])
    return float(np.float32(np.float32(lo + hi) / np.float32(2.0)))


@numba.njit(cache=True, nogil=True)
def _kth(a, k):  # pragma: no cover - compiled
    """The k-th smallest value of ``a`` (reordered in place: a[:k] <= a[k] <= a[k+1:]); Hoare's
    selection (the value is the order statistic, whatever the method)."""
    lo, hi = 0, a.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(cache=True, nogil=True)
def segment(h, local, near, core, thr, n):  # pragma: no cover - compiled
    """Watershed of the Sobel gradient from the cores (background: beyond ``near``); a pixel is
    kept for its owner when it is above the owner's threshold and the owner is its nearest
    nucleus or its ST label; then :func:`clean_labels`."""
    H, W = h.shape
    markers = np.empty((H, W), np.int32)
    need = np.zeros((H, W), np.bool_)  # the pixels the flooding reads: near a nucleus, and their 4-neighbours
    for i in range(H):
        for j in range(W):
            markers[i, j] = n + 1 if near[i, j] == 0 else core[i, j]
            if near[i, j] != 0:
                need[i, j] = True
                if i > 0:
                    need[i - 1, j] = True
                if i < H - 1:
                    need[i + 1, j] = True
                if j > 0:
                    need[i, j - 1] = True
                if j < W - 1:
                    need[i, j + 1] = True
    ws = _watershed(sobel_where(h, need), markers, h)
    out = np.zeros((H, W), np.int32)
    for i in range(H):
        for j in range(W):
            w = ws[i, j]
            if w == n + 1 or w <= 0:
                continue
            if (w == near[i, j] or w == local[i, j]) and np.float64(h[i, j]) > thr[near[i, j]]:
                out[i, j] = w
    return clean_labels(out, core, n)


@numba.njit(cache=True, nogil=True)
def areas(local, out, n):  # pragma: no cover - compiled
    """Pixel counts per label 0..n of the ST map and of the refined one (as float64)."""
    c0 = np.zeros(n + 1, np.int64)
    c1 = np.zeros(n + 1, np.int64)
    H, W = local.shape
    for i in range(H):
        for j in range(W):
            c0[local[i, j]] += 1
            c1[out[i, j]] += 1
    return c0.astype(np.float64), c1.astype(np.float64)


@numba.njit(cache=True, nogil=True)
def guarded(local, out, keep_st, drop, ids, not_vis):  # pragma: no cover - compiled
    """Refined global ids: dropped labels removed, kept-ST labels back to their ST pixels;
    and the not-visible mask."""
    H, W = local.shape
    res = np.empty((H, W), ids.dtype)
    nv = np.empty((H, W), np.bool_)
    for i in range(H):
        for j in range(W):
            o = out[i, j]
            v = 0 if drop[o] else o
            loc = local[i, j]
            if v == 0 and keep_st[loc]:
                v = loc
            res[i, j] = ids[v]
            nv[i, j] = not_vis[loc]
    return res, nv


@numba.njit(cache=True, nogil=True)
def _runs(flat):  # pragma: no cover - compiled
    """Runs of equal values of a 1-D array: ``starts`` (flat index of each run's first element,
    plus ``flat.size`` as a last sentinel) and ``vals`` (each run's value)."""
    m = flat.size
    n_runs = 1 if m else 0
    for p in range(1, m):
        if flat[p] != flat[p - 1]:
            n_runs += 1
    starts = np.empty(n_runs + 1, np.int64)
    vals = np.empty(n_runs, flat.dtype)
    r = 0
    for p in range(m):
        if p == 0 or flat[p] != flat[p - 1]:
            starts[r] = p
            vals[r] = flat[p]
            r += 1
    starts[n_runs] = m
    return starts, vals


@numba.njit(cache=True, nogil=True)
def first_pixels(inst):  # pragma: no cover - compiled
    """Sorted distinct values of ``inst`` and the flat index of the first pixel (raster order) of
    each: ``np.unique(inst, return_index=True)``, found from the runs of equal pixels."""
    flat = inst.ravel()
    starts, vals = _runs(flat)
    n_runs = vals.size
    order = np.argsort(vals, kind="mergesort")  # stable: the earliest run of a value comes first
    n = 0
    for t in range(n_runs):
        if t == 0 or vals[order[t]] != vals[order[t - 1]]:
            n += 1
    ids = np.empty(n, flat.dtype)
    pos = np.empty(n, np.int64)
    n = 0
    for t in range(n_runs):
        if t == 0 or vals[order[t]] != vals[order[t - 1]]:
            ids[n] = vals[order[t]]
            pos[n] = starts[order[t]]
            n += 1
    return ids, pos


@numba.njit(cache=True, nogil=True)
def follow_instances(inst, refined, ign, not_vis, type_map, conf):  # pragma: no cover - compiled
    """The maps of :func:`stlib.labels.refine.refine_label_maps` after the refinement: instances
    (``inst`` where ``ign``, else ``refined``), their class and confidence (``type_map`` /
    ``conf`` at the id's first pixel in ``inst``, :func:`first_pixels`; 0 on background and on
    not-visible pixels) and ignore (``ign`` or ``not_vis``)."""
    H, W = inst.shape
    ids, pos = first_pixels(inst)
    tf = type_map.ravel()
    cfl = conf.ravel()
    new_inst = np.empty((H, W), inst.dtype)
    new_type = np.zeros((H, W), np.uint8)
    new_conf = np.zeros((H, W), np.uint8)
    new_ign = np.empty((H, W), np.uint8)
    last = -1
    k = 0
    for i in range(H):
        for j in range(W):
            g = ign[i, j]
            v = inst[i, j] if g else refined[i, j]
            new_inst[i, j] = v
            nv = not_vis[i, j]
            new_ign[i, j] = 1 if (g or nv) else 0
            if v > 0 and not nv:
                if v != last:
                    k = np.searchsorted(ids, v)
                    last = v
                new_type[i, j] = tf[pos[k]]
                new_conf[i, j] = cfl[pos[k]]
    return new_inst, new_type, new_ign, new_conf


# --------------------------------------------------------------------------------------
# the per-nucleus decisions of refine_instances (its numpy glue on (n + 1)-arrays, fused)
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _nanmedian(x):  # pragma: no cover - compiled
    """``np.nanmedian`` of a 1-D float64 array: the middle value, or ``(a + b) / 2`` of the two
    middle values, NaN when there is no value."""
    m = 0
    for v in x:
        if not np.isnan(v):
            m += 1
    if m == 0:
        return np.nan
    buf = np.empty(m, np.float64)
    k = 0
    for v in x:
        if not np.isnan(v):
            buf[k] = v
            k += 1
    buf.sort()
    if m % 2:
        return buf[m // 2]
    return (buf[m // 2 - 1] + buf[m // 2]) / 2.0


@numba.njit(cache=True, nogil=True)
def thresholds(h, core, ring, outside, n, edge_fraction, min_rel_contrast, min_contrast_od):  # pragma: no cover
    """Per label 0..n: the haematoxylin threshold of its boundary and whether it is not visible.

    :func:`stlib.labels.refine.refine_instances`' steps on the label medians, as its numpy lines
    computed them: core median ``fg`` and ring median ``bg`` (:func:`label_median`; a label
    without ring pixels takes the median over ``outside``, or the smallest ``fg`` when that is
    empty), ``contrast = fg - bg``, the visibility floor from the median contrast
    (``np.nanmedian``), ``thr = bg + edge_fraction * contrast`` (``thr[0] = inf``).
    """
    fg = label_median(h, core, n)
    bg = label_median(h, ring, n)
    missing = False
    for k in range(1, n + 1):
        if not np.isfinite(bg[k]):
            missing = True
            break
    if missing:  # the tile's background median is needed only for nuclei without a ring
        tile_bg = masked_median(h, outside)
        if not np.isfinite(tile_bg):
            tile_bg = np.nan  # np.nanmin(fg[1:]): NaN when every fg is NaN
            for k in range(1, n + 1):
                v = fg[k]
                if not np.isnan(v) and (np.isnan(tile_bg) or v < tile_bg):
                    tile_bg = v
        for k in range(n + 1):
            if not np.isfinite(bg[k]):
                bg[k] = tile_bg
    contrast = fg - bg
    ref = _nanmedian(contrast[1:])
    floor = min_contrast_od
    if np.isfinite(ref) and ref > 0:
        floor = max(floor, min_rel_contrast * ref)
    not_vis = np.empty(n + 1, np.bool_)
    thr = np.empty(n + 1, np.float64)
    for k in range(n + 1):
        not_vis[k] = not (contrast[k] >= floor)
        thr[k] = bg[k] + edge_fraction * contrast[k]
    not_vis[0] = False
    thr[0] = np.inf
    return thr, not_vis


@numba.njit(cache=True, nogil=True)
def guards(local, out, not_vis, n, min_keep, max_grow):  # pragma: no cover - compiled
    """The guards of :func:`stlib.labels.refine._guards` from the ST map ``local`` and the
    refined one ``out``: ``keep_st``, ``drop`` and the statistics ``(n, refined, kept_st,
    not_visible, area_st, area_refined)`` (areas summed over the refined labels)."""
    a0, a1 = areas(local, out, n)
    keep_st = np.zeros(n + 1, np.bool_)
    drop = np.zeros(n + 1, np.bool_)
    st = np.zeros(6, np.int64)
    st[0] = n
    for k in range(1, n + 1):
        keep_st[k] = ((a1[k] < min_keep * a0[k]) or (a1[k] > max_grow * a0[k])) and not not_vis[k]
        drop[k] = keep_st[k] or not_vis[k]
        st[2] += keep_st[k]
        st[3] += not_vis[k]
        if not drop[k]:
            st[1] += 1
            st[4] += np.int64(a0[k])
            st[5] += np.int64(a1[k])
    drop[0] = not_vis[0]
    return keep_st, drop, st


# --------------------------------------------------------------------------------------
# the numpy glue at the start of refine_label_maps / refine_instances, fused
# --------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def unignored(inst, ignore):  # pragma: no cover - compiled
    """``ign = ignore.astype(bool)`` and ``np.where(ign, 0, inst)``."""
    H, W = inst.shape
    ign = np.empty((H, W), np.bool_)
    work = np.empty((H, W), inst.dtype)
    for i in range(H):
        for j in range(W):
            g = ignore[i, j] != 0
            ign[i, j] = g
            work[i, j] = 0 if g else inst[i, j]
    return ign, work


@numba.njit(cache=True, nogil=True)
def local_ids(inst):  # pragma: no cover - compiled
    """:func:`stlib.labels.refine._local_ids` (fast form) of a non-empty 2-D map: the sorted
    distinct values of the runs of equal pixels (``ids``, 0 put first when the tile has no
    background) and each pixel's index into them (int32)."""
    H, W = inst.shape
    flat = inst.ravel()
    m = flat.size
    starts, vals = _runs(flat)
    nr = vals.size
    u = np.unique(vals)
    off = 0 if u[0] == 0 else 1
    ids = np.zeros(u.size + off, np.int64)
    for k in range(u.size):
        ids[k + off] = u[k]
    local = np.empty(m, np.int32)
    for r in range(nr):
        k = np.int32(np.searchsorted(u, vals[r]) + off)
        for p in range(starts[r], starts[r + 1]):
            local[p] = k
    return ids, local.reshape((H, W)), ids.size - 1
