"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), exact and memory-bounded.

The numbers are those of the feature-based algorithm published with re-ID baselines (`re_ranking(probFea, galFea,
k1, k2, lambda_value)`), computed without any N x N matrix (N = Q + G, queries first, then gallery):

1. d(i, j): squared Euclidean distance, in float64, between the features as given; each row is divided by its
   maximum over the N items: nd(i, j) = d(i, j) / max_j d(i, j) (a row whose maximum is 0, i.e. N identical items,
   is divided by 1 instead).
2. The ranked list of item i: the items ordered by nd(i, .) ascending, equal values in index order (a stable
   argsort). F(i, k) = its first k + 1 items (i itself is usually the first). R(i, k) = the k-reciprocal set:
   the c in F(i, k) with i in F(c, k).
3. Expansion: R*(i) = R(i, k1) plus every R(c, h) (h = round(k1 / 2), half to even) of a c in R(i, k1) with
   |R(c, h) & R(i, k1)| > 2/3 |R(c, h)|.
4. Encoding: V(i, j) = exp(-nd(i, j)) / sum over R*(i) for j in R*(i), 0 elsewhere (float64 here; the published
   code stores V in float16).
5. Local query expansion (k2 != 1): V(i) = mean of V(c) over the first k2 items c of i's ranked list (i included).
6. Jaccard distance of query q and gallery item g: 1 - m / (2 - m), m = sum_j min(V(q, j), V(g, j)); equal to
   1 - sum min / sum max because every row of V sums to 1.
7. final(q, g) = (1 - lambda) * jaccard(q, g) + lambda * nd(q, g).

How the memory stays bounded: the ranked lists come from blocked float32 products (|a|^2 + |b|^2 - 2ab on centred
features, a block's distances <= `block_bytes`) and `torch.topk` with a few extra candidates; the kept candidates'
distances (and the row maximum's) are computed again in float64 from the features and the lists ordered by those.
Where the float32 rounding bound cannot rule out an item outside the fetched candidates, the row is redone with
float64 products, and as a last resort with a full float64 row, so the lists are those of a float64 argsort. The
reciprocal checks and the expansion are vectorised over the [N, k1 + 1] lists, V is a scipy CSR matrix, the local
query expansion a sparse product, and the Jaccard distances are accumulated only over the (query, column, gallery)
triples where both rows hold the column, for one block of queries at a time.
"""
from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import torch

from metriclab.core.progress import progress

EXTRA_CANDIDATES = 8  # candidates fetched beyond the k kept, so near-ties in float32 can be re-ordered in float64
MAX_CANDIDATES = 8  # largest-distance candidates fetched per row to find the row maximum in float64
PAIR_CHUNK_ELEMS = 1 << 22  # float64 elements of one gathered (pairs x D) difference array: 32 MB
TRIPLE_CHUNK = 1 << 22  # (query, column, gallery) triples expanded at once in the Jaccard accumulation
RECIPROCAL_CHUNK_ELEMS = 1 << 24  # elements of one chunk's candidate arrays / membership scratch in the expansion


def check_k_reciprocal(n_items: int, k1: int, k2: int, lambda_value: float) -> None:
    """Raise ValueError (one line naming the key) unless 1 <= k1 <= n_items - 1, 1 <= k2 <= n_items - 1 and
    0 <= lambda_value <= 1; n_items = N = Q + G (k1 + 1 neighbours, the item itself included, must exist)."""
    for key, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if not 1 <= value <= n_items - 1:
            raise ValueError(
                f"{key} must be in [1, {n_items - 1}] (the number of items N = Q + G = {n_items}, minus 1: "
                f"{key} + 1 neighbours, the item itself included, must exist), got {value}"
            )
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


def _pair_sqdist(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 squared distances sum((x[r] - x[c])^2) of the pairs (rows[t], cols[t]); x: float64 [N, D] (the
    float32 features, converted exactly), in bounded chunks."""
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, PAIR_CHUNK_ELEMS // max(1, x.shape[1]))
    for s in range(0, len(rows), step):
        diff = x[torch.from_numpy(rows[s:s + step])] - x[torch.from_numpy(cols[s:s + step])]
        out[s:s + step] = diff.square_().sum(dim=1).numpy()
    return out


def _candidate_sqdist(x: torch.Tensor, rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """float64 [len(rows), k] squared distances of rows[t] to cands[t, :]; x: float64 [N, D]."""
    n_rows, k = cands.shape
    out = np.empty((n_rows, k), dtype=np.float64)
    step = max(1, PAIR_CHUNK_ELEMS // max(1, k * x.shape[1]))
    for s in range(0, n_rows, step):
        diff = x[torch.from_numpy(rows[s:s + step])].unsqueeze(1) - x[torch.from_numpy(cands[s:s + step])]
        out[s:s + step] = diff.square_().sum(dim=2).numpy()
    return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[t], starts[t] + counts[t]) over t."""
    total = int(counts.sum())
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + offsets


class KReciprocal:
    """k-reciprocal re-ranked distances of queries against gallery, built once, read block by block.

    `q_emb` [Q, D] and `g_emb` [G, D]: float32 CPU tensors (finite; Q, G >= 1). `k1` (20), `k2` (6) and
    `lambda_value` (0.3) are the paper's defaults. `block_bytes` (64 MB) bounds one block of float32 distances while
    the ranked lists are built and one block of float64 Jaccard sums / original distances while `block` is read.
    Building keeps O(N (k1 + D)) memory plus the sparse encodings (about N x |R*| x k2 entries), never N x N.
    """

    def __init__(self, q_emb: torch.Tensor, g_emb: torch.Tensor, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, block_bytes: int = 64 << 20):
        if q_emb.ndim != 2 or g_emb.ndim != 2 or q_emb.shape[1] != g_emb.shape[1]:
            raise ValueError(f"q_emb and g_emb must be [Q, D] and [G, D], got {tuple(q_emb.shape)} and "
                             f"{tuple(g_emb.shape)}")
        if len(q_emb) < 1 or len(g_emb) < 1:
            raise ValueError(f"k-reciprocal re-ranking needs at least one query and one gallery item, got "
                             f"Q={len(q_emb)}, G={len(g_emb)}")
        self.n_query, self.n_gallery = len(q_emb), len(g_emb)
        self.n_items = self.n_query + self.n_gallery
        check_k_reciprocal(self.n_items, k1, k2, lambda_value)
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        self.k1, self.k2, self.lambda_value = int(k1), int(k2), float(lambda_value)
        self.block_bytes = int(block_bytes)
        self.half = int(np.around(self.k1 / 2))  # round half to even, as the published code does

        x = torch.cat([q_emb.detach().cpu(), g_emb.detach().cpu()]).to(torch.float32)
        self._x64 = x.to(torch.float64)  # exact copy of the float32 features
        # centred copy: distances do not change, the rounding of |a|^2 + |b|^2 - 2ab does (much smaller)
        centred = self._x64 - self._x64.mean(dim=0)
        self._c64 = centred
        self._sq64 = (centred * centred).sum(dim=1)
        n_keep = max(self.k1 + 1, self.k2)
        self._rank, self._rank_d, self._row_max = self._ranked_lists(n_keep)
        self._reciprocal = self._reciprocal_mask(self.k1 + 1)  # [N, k1 + 1]: R(i, k1) within F(i, k1)
        self._v0 = self._encode()  # V before local query expansion
        if self.k2 != 1:
            n = self.n_items
            averaging = sp.csr_matrix(
                (np.ones(n * self.k2), self._rank[:, :self.k2].ravel(), np.arange(0, n * self.k2 + 1, self.k2)),
                shape=(n, n),
            )
            v = (averaging @ self._v0).tocsr()
            v.data /= self.k2
        else:
            v = self._v0
        v.sort_indices()
        self._v = v
        self._v_query = v[:self.n_query]
        self._v_gallery = v[self.n_query:].tocsc()
        self._v_gallery.sort_indices()

    # ------------------------------------------------------------------------------------------------ ranked lists

    def _row_bound(self, centred_norm: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        """Per row: a bound on |computed - exact| of the blocked |a|^2 + |b|^2 - 2ab distances in `dtype`
        (dot products: gamma_D |a||b|; norms; the final additions; rounding of the centred copy)."""
        unit = float(torch.finfo(dtype).eps) / 2
        dim = self._x64.shape[1]
        reach = (centred_norm + centred_norm.max()).numpy()
        return 2.0 * (dim + 8) * unit * reach * reach

    def _select(self, rows: np.ndarray, n_keep: int, dtype: torch.dtype):
        """Ranked lists (first `n_keep` items), their float64 distances and the row maxima of `rows`, from blocked
        products in `dtype`; also a mask of the rows whose result the rounding bound cannot guarantee."""
        n = self.n_items
        feats = self._c64.to(dtype)
        sq = (feats * feats).sum(dim=1)
        bound = self._row_bound(self._sq64.sqrt(), dtype)[rows]
        n_low = min(n, n_keep + EXTRA_CANDIDATES)
        n_high = min(n, MAX_CANDIDATES)
        itemsize = torch.finfo(dtype).bits // 8
        step = max(1, self.block_bytes // (itemsize * n))
        low_idx = np.empty((len(rows), n_low), dtype=np.int64)
        low_val = np.empty((len(rows), n_low), dtype=np.float64)
        high_idx = np.empty((len(rows), n_high), dtype=np.int64)
        high_val = np.empty((len(rows), n_high), dtype=np.float64)
        buf = torch.empty((step, n), dtype=dtype)
        for s in progress(range(0, len(rows), step), "re-ranking: nearest neighbours", -(-len(rows) // step), "block"):
            sel = torch.from_numpy(rows[s:s + step])
            out = buf[:len(sel)]
            torch.addmm(sq.unsqueeze(0).expand(len(sel), n), feats[sel], feats.T, alpha=-2.0, out=out)
            out.add_(sq[sel].unsqueeze(1))
            vals, idx = torch.topk(out, n_low, dim=1, largest=False, sorted=True)
            low_idx[s:s + len(sel)], low_val[s:s + len(sel)] = idx.numpy(), vals.numpy()
            vals, idx = torch.topk(out, n_high, dim=1, largest=True, sorted=True)
            high_idx[s:s + len(sel)], high_val[s:s + len(sel)] = idx.numpy(), vals.numpy()
        del buf
        low_d = _candidate_sqdist(self._x64, rows, low_idx)
        high_d = _candidate_sqdist(self._x64, rows, high_idx)
        row_max = np.maximum(low_d.max(axis=1), high_d.max(axis=1))
        unsure = np.zeros(len(rows), dtype=bool)
        if n_high < n:  # an item outside the fetched largest could be the maximum
            unsure |= high_val[:, -1] + bound >= row_max
        norm = np.where(row_max > 0, row_max, 1.0)
        nd = low_d / norm[:, None]
        order = np.lexsort((low_idx, nd), axis=1)[:, :n_keep]
        rank = np.take_along_axis(low_idx, order, axis=1)
        rank_d = np.take_along_axis(low_d, order, axis=1)
        if n_low < n:  # an item outside the fetched smallest could belong to the kept list
            unsure |= low_val[:, -1] - bound <= rank_d[:, -1]
        return rank, rank_d, row_max, unsure

    def _full_rows(self, rows: np.ndarray, n_keep: int):
        """Ranked lists, float64 distances and maxima of `rows` from their complete float64 rows (last resort)."""
        n = self.n_items
        rank = np.empty((len(rows), n_keep), dtype=np.int64)
        rank_d = np.empty((len(rows), n_keep), dtype=np.float64)
        row_max = np.empty(len(rows), dtype=np.float64)
        everyone = np.arange(n)
        for t, i in enumerate(rows):
            d = _candidate_sqdist(self._x64, np.array([i]), everyone[None, :])[0]
            row_max[t] = d.max()
            nd = d / (row_max[t] if row_max[t] > 0 else 1.0)
            order = np.argsort(nd, kind="stable")[:n_keep]
            rank[t], rank_d[t] = order, d[order]
        return rank, rank_d, row_max

    def _ranked_lists(self, n_keep: int):
        rows = np.arange(self.n_items)
        rank, rank_d, row_max, unsure = self._select(rows, n_keep, torch.float32)
        self.n_rows_float64 = int(unsure.sum())  # rows redone with float64 products (diagnostics)
        self.n_rows_full = 0  # rows redone from their full float64 row (diagnostics)
        if unsure.any():
            redo = rows[unsure]
            r2, d2, m2, unsure2 = self._select(redo, n_keep, torch.float64)
            rank[redo], rank_d[redo], row_max[redo] = r2, d2, m2
            if unsure2.any():
                last = redo[unsure2]
                self.n_rows_full = len(last)
                rank[last], rank_d[last], row_max[last] = self._full_rows(last, n_keep)
        return rank, rank_d, row_max

    # --------------------------------------------------------------------------------- reciprocal sets, encoding

    def _reciprocal_mask(self, width: int) -> np.ndarray:
        """[N, width] bool: F[i, p] is k-reciprocal to i (i is in F[F[i, p]]), where F = the first `width` items of
        the ranked lists; a membership test of the pairs (F[i, p], i) among the sorted pairs (c, F[c, .])."""
        n = self.n_items
        first = self._rank[:, :width]
        members = (np.arange(n, dtype=np.int64)[:, None] * n + np.sort(first, axis=1)).ravel()  # sorted
        wanted = (first * n + np.arange(n, dtype=np.int64)[:, None]).ravel()
        pos = np.minimum(np.searchsorted(members, wanted), len(members) - 1)
        return (members[pos] == wanted).reshape(n, width)

    def _encode(self) -> sp.csr_matrix:
        """V before local query expansion: rows R*(i) with weights exp(-nd) normalised to sum 1."""
        n, width, hw = self.n_items, self.k1 + 1, self.half + 1
        first = self._rank[:, :width]
        half_mask = self._reciprocal_mask(hw)  # R(c, round(k1 / 2)) within F(c, round(k1 / 2))
        half_first = self._rank[:, :hw]
        rows_out, cols_out = [], []
        # rows per chunk: the [b, width, hw] candidate arrays and a [b, N] membership scratch stay bounded
        step = max(1, RECIPROCAL_CHUNK_ELEMS // max(width * hw, n))
        member = np.zeros((min(step, n), n), dtype=bool)  # member[r, x]: x is in R(s + r, k1)
        for s in progress(range(0, n, step), "re-ranking: reciprocal sets", -(-n // step), "block"):
            e = min(n, s + step)
            cand, recip = first[s:e], self._reciprocal[s:e]  # [b, width]
            bi, pi = np.nonzero(recip)
            members = cand[bi, pi]
            member[bi, members] = True
            cand_half, cand_half_mask = half_first[cand], half_mask[cand]  # [b, width, hw]
            hit = member[np.arange(e - s)[:, None, None], cand_half] & cand_half_mask
            member[bi, members] = False
            inter = hit.sum(axis=2)  # |R(c, h) & R(i, k1)|
            size = cand_half_mask.sum(axis=2)  # |R(c, h)|
            grow = recip & (inter > 2.0 / 3.0 * size)  # [b, width]: candidates whose R(c, h) is appended
            rows_out.append(bi + s)
            cols_out.append(members)
            bi, pi, qi = np.nonzero(grow[..., None] & cand_half_mask)
            rows_out.append(bi + s)
            cols_out.append(cand_half[bi, pi, qi])
        keys = np.unique(np.concatenate(rows_out).astype(np.int64) * n + np.concatenate(cols_out))
        rows, cols = keys // n, keys % n
        dist = self._lookup_distances(rows, cols)
        weight = np.exp(-dist / np.where(self._row_max > 0, self._row_max, 1.0)[rows])
        weight /= np.bincount(rows, weight, minlength=n)[rows]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        return sp.csr_matrix((weight, cols, indptr), shape=(n, n))

    def _lookup_distances(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float64 d(rows[t], cols[t]): from the ranked lists where the pair is there, computed otherwise."""
        n, width = self.n_items, self._rank.shape[1]
        known = np.repeat(np.arange(n, dtype=np.int64), width) * n + self._rank.ravel()
        order = np.argsort(known)
        known = known[order]
        keys = rows * n + cols
        pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        found = known[pos] == keys
        out = np.empty(len(keys), dtype=np.float64)
        out[found] = self._rank_d.ravel()[order[pos[found]]]
        out[~found] = _pair_sqdist(self._x64, rows[~found], cols[~found])
        return out

    # ------------------------------------------------------------------------------------------- public reading

    def ranked_neighbours(self, i: int) -> np.ndarray:
        """The first max(k1 + 1, k2) items of item i's ranked list (item indices: queries 0..Q-1, then gallery)."""
        return self._rank[i].copy()

    def k_reciprocal_sets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(R(i, k1), R*(i)) of item i as sorted item indices: its k-reciprocal set and its expanded set."""
        recip = np.sort(self._rank[i, :self.k1 + 1][self._reciprocal[i]])
        lo, hi = self._v0.indptr[i], self._v0.indptr[i + 1]
        return recip, self._v0.indices[lo:hi].copy()

    def encoding(self, i: int, expanded: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(columns, weights) of row i of V: after local query expansion (`expanded`, what the Jaccard distances
        use; the same as before when k2 = 1) or before it."""
        v = self._v if expanded else self._v0
        lo, hi = v.indptr[i], v.indptr[i + 1]
        return v.indices[lo:hi].copy(), v.data[lo:hi].copy()

    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= self.n_query:
            raise ValueError(f"query block [{lo}, {hi}) outside [0, {self.n_query}]")

    def _step(self) -> int:
        return max(1, self.block_bytes // (8 * self.n_gallery))

    def _original64(self, lo: int, hi: int) -> torch.Tensor:
        """float64 nd(q, g) for queries lo..hi-1 against the whole gallery."""
        q = self._c64[lo:hi]
        g = self._c64[self.n_query:]
        d = torch.addmm(self._sq64[self.n_query:].unsqueeze(0).expand(hi - lo, -1), q, g.T, alpha=-2.0)
        d.add_(self._sq64[lo:hi].unsqueeze(1)).clamp_(min=0.0)
        norm = np.where(self._row_max[lo:hi] > 0, self._row_max[lo:hi], 1.0)
        return d.div_(torch.from_numpy(norm).unsqueeze(1))

    def _temp_min(self, lo: int, hi: int) -> np.ndarray:
        """float64 [hi - lo, G]: sum_j min(V(q, j), V(g, j)), accumulated over the shared columns only."""
        n_g, b = self.n_gallery, hi - lo
        vq, vg = self._v_query, self._v_gallery
        a, z = vq.indptr[lo], vq.indptr[hi]
        q_row = np.repeat(np.arange(b, dtype=np.int64), np.diff(vq.indptr[lo:hi + 1]))
        cols, vals = vq.indices[a:z], vq.data[a:z]
        starts = vg.indptr[cols].astype(np.int64)
        counts = vg.indptr[cols + 1].astype(np.int64) - starts
        acc = np.zeros(b * n_g, dtype=np.float64)
        cum = np.cumsum(counts)
        s = 0
        while s < len(cols):
            e = max(s + 1, int(np.searchsorted(cum, (cum[s - 1] if s else 0) + TRIPLE_CHUNK, side="right")))
            c = counts[s:e]
            pos = _ranges(starts[s:e], c)
            mins = np.minimum(np.repeat(vals[s:e], c), vg.data[pos])
            acc += np.bincount(np.repeat(q_row[s:e], c) * n_g + vg.indices[pos], mins, minlength=b * n_g)
            s = e
        return acc.reshape(b, n_g)

    def block64(self, lo: int, hi: int) -> np.ndarray:
        """float64 [hi - lo, G]: final re-ranked distances of queries lo..hi-1 against the whole gallery."""
        self._check_range(lo, hi)
        out = np.empty((hi - lo, self.n_gallery), dtype=np.float64)
        step = self._step()
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            tm = self._temp_min(s, e)
            jaccard = 1.0 - tm / (2.0 - tm)
            jaccard *= 1.0 - self.lambda_value
            jaccard += self.lambda_value * self._original64(s, e).numpy()
            out[s - lo:e - lo] = jaccard
        return out

    def block(self, lo: int, hi: int) -> np.ndarray:
        """float32 [hi - lo, G]: `block64` rounded to float32."""
        return self.block64(lo, hi).astype(np.float32)

    def original(self, lo: int, hi: int) -> np.ndarray:
        """float32 [hi - lo, G]: the row-normalised original distances nd(q, g) of queries lo..hi-1."""
        self._check_range(lo, hi)
        out = np.empty((hi - lo, self.n_gallery), dtype=np.float32)
        step = self._step()
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            out[s - lo:e - lo] = self._original64(s, e).numpy()
        return out
