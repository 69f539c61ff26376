"""SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023): one Linear pruned with optimal-brain-surgeon updates of the weights that stay.

For a Linear ``y = W x`` with calibration inputs X (tokens x d_in), the layer-wise objective is
||W X^T - W' X^T||^2 with Hessian H = X^T X (up to a factor 2 that cancels). Columns are visited left to right;
when column j is reached, the remaining weights of each row are those of columns >= j, and pruning w_rj changes the
others of that row by the OBS update

    delta_r = - w_rj / [H_F^-1]_jj * [H_F^-1]_j,:        (H_F = H restricted to columns j, j+1, ...)

All the inverses of the trailing sub-matrices come from ONE Cholesky factor: with H^-1 = U^T U (U upper
triangular), row j of U is [H_F^-1]_j,: / sqrt([H_F^-1]_jj), so the update is - w_rj / U_jj * U_j,: . Updates are
applied lazily: within a block of ``blocksize`` columns at once, to the columns after the block by one matrix
product. The mask is chosen adaptively, block by block (``mask_block`` columns, here the same as the lazy block):
at the start of a block the pruning score of weight (r, c) is w_rc^2 / U_cc^2 (the OBS saliency), and the lowest
scores are pruned: for an unstructured sparsity p the lowest p share of the whole block (so rows may differ), for
an N:M pattern the M-N lowest of each group of M consecutive inputs in each row. Damping: H + damp * mean(diag H) * I
(the paper's 1%); an input that never fires (diag 0) gets diag 1 and its weights are pruned.

This is written here from the paper's algorithm (its Algorithm 1); :func:`sparsegpt_reference` is the same
procedure computed directly (an explicit inverse per column, no blocking), for the tests.
"""
from __future__ import annotations

import math

import torch


def _prepare(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W = W.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be {W.shape[1]} x {W.shape[1]} (inputs of the Linear), got {tuple(H.shape)}")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return W, H, dead


def _pattern(sparsity: float, n: int | None, m: int | None) -> tuple[float, int | None, int | None]:
    if (n is None) != (m is None):
        raise ValueError("give both n and m (an N:M pattern keeps n of every m) or neither")
    if n is not None:
        if not 0 < n < m:
            raise ValueError(f"an N:M pattern needs 0 < n < m, got {n}:{m}")
        return 1 - n / m, n, m
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity, None, None


def _block_mask(Wb: torch.Tensor, d: torch.Tensor, sparsity: float, n: int | None, m: int | None) -> torch.Tensor:
    """True where a weight of the block is pruned: the lowest OBS scores w^2 / d^2."""
    score = Wb.pow(2) / d.pow(2).unsqueeze(0)
    if n is not None:
        if Wb.shape[1] % m:
            raise ValueError(f"the block width {Wb.shape[1]} is not a multiple of m = {m}")
        g = score.reshape(score.shape[0], -1, m)
        order = torch.argsort(g, dim=-1, stable=True)  # ascending: the first m - n of each group are pruned
        pruned = torch.zeros_like(g, dtype=torch.bool)
        pruned.scatter_(-1, order[..., :m - n], True)
        return pruned.reshape(Wb.shape)
    k = int(round(sparsity * score.numel()))
    pruned = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        pruned[torch.argsort(score.flatten(), stable=True)[:k]] = True
    return pruned.reshape(Wb.shape)


def sparsegpt(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.5, n: int | None = None,
              m: int | None = None, blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (d_out x d_in) given the inputs' Gram ``H`` (d_in x d_in, = X^T X); returns (the new weights in
    ``W``'s dtype, the keep mask). ``n`` / ``m``: an N:M pattern along the inputs (``blocksize`` must then be a
    multiple of ``m``); else ``sparsity``, unstructured, chosen per block of ``blocksize`` columns."""
    sparsity, n, m = _pattern(sparsity, n, m)
    if blocksize < 1 or (m is not None and blocksize % m):
        raise ValueError(f"blocksize must be >= 1 (and a multiple of m for N:M), got {blocksize}")
    if m is not None and W.shape[1] % m:
        raise ValueError(f"an {n}:{m} pattern needs the inputs ({W.shape[1]}) to be a multiple of {m}")
    dtype = W.dtype
    W, H, _ = _prepare(W, H, damp)
    d_in = W.shape[1]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i in range(0, d_in, blocksize):
        j_end = min(i + blocksize, d_in)
        Wb = W[:, i:j_end].clone()
        Ub = U[i:j_end, i:j_end]
        mask = _block_mask(Wb, torch.diagonal(Ub), sparsity, n, m)
        E = torch.zeros_like(Wb)
        for c in range(j_end - i):
            w = Wb[:, c]
            err = torch.where(mask[:, c], w / Ub[c, c], torch.zeros_like(w))
            Wb[:, c:] -= err.unsqueeze(1) * Ub[c, c:].unsqueeze(0)
            E[:, c] = err
        Wb[mask] = 0.0
        W[:, i:j_end] = Wb
        W[:, j_end:] -= E @ U[i:j_end, j_end:]
        pruned[:, i:j_end] = mask
    W[pruned] = 0.0
    return W.to(dtype), ~pruned


def sparsegpt_reference(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.5, n: int | None = None,
                        m: int | None = None, blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The same procedure computed directly (for tests; O(d_in^4)): column by column, the inverse of the trailing
    Hessian taken explicitly, every update applied at once; the mask chosen at each block start from the scores
    w^2 / [H_F^-1]_cc with H_F trailing from column c."""
    sparsity, n, m = _pattern(sparsity, n, m)
    dtype = W.dtype
    W, H, _ = _prepare(W, H, damp)
    d_in = W.shape[1]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i in range(0, d_in, blocksize):
        j_end = min(i + blocksize, d_in)
        d = torch.tensor([math.sqrt(float(torch.linalg.inv(H[c:, c:])[0, 0])) for c in range(i, j_end)],
                         dtype=W.dtype)
        pruned[:, i:j_end] = _block_mask(W[:, i:j_end], d, sparsity, n, m)
        for c in range(i, j_end):
            Finv = torch.linalg.inv(H[c:, c:])
            for r in range(W.shape[0]):
                if pruned[r, c]:
                    W[r, c:] -= W[r, c] / Finv[0, 0] * Finv[0, :]
    W[pruned] = 0.0
    return W.to(dtype), ~pruned
