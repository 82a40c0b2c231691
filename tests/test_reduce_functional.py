"""Property-based tests (hypothesis) of the selection functions in reduce/functional.py: topk_keep, fuse_tokens,
keep_and_fuse, checked against plain Python on small shapes (B <= 4, M <= 33, D <= 16)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprune.reduce import functional as F
from vlprune.reduce.state import CLS, FUSED, KEPT

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True)


@st.composite
def problems(draw, max_m=33):
    B = draw(st.integers(1, 4))
    M = draw(st.integers(1, max_m))
    D = draw(st.integers(1, 16))
    k = draw(st.integers(1, M))
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())  # scores on a coarse grid, so that ties happen
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, M, generator=g)
    if ties:
        scores = (scores * 3).floor() / 3
    x = torch.randn(B, 1 + M, D, generator=g)
    return B, M, D, k, scores, x


def python_topk(row, k):
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    return sorted(order[:k]), sorted(order[k:])


@SETTINGS
@given(problems())
def test_topk_keep_matches_a_python_sort(p):
    B, M, D, k, scores, _ = p
    keep, drop = F.topk_keep(scores, k)
    assert keep.shape == (B, k) and drop.shape == (B, M - k)
    for b in range(B):
        want_keep, want_drop = python_topk(scores[b].tolist(), k)
        assert keep[b].tolist() == want_keep and drop[b].tolist() == want_drop


@SETTINGS
@given(problems(), st.integers(0, 2**31 - 1))
def test_topk_keep_is_permutation_consistent(p, seed):
    B, M, D, k, scores, _ = p
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    keep, _ = F.topk_keep(scores, k)
    keep_p, _ = F.topk_keep(scores[:, perm], k)
    for b in range(B):
        assert sorted(scores[b, keep[b]].tolist()) == sorted(scores[b, perm[keep_p[b]]].tolist())
        if len(set(scores[b].tolist())) == M:  # without ties the same tokens are kept
            assert set(keep[b].tolist()) == set(perm[keep_p[b]].tolist())


@SETTINGS
@given(problems(), st.booleans())
def test_fuse_tokens_is_the_weighted_sum(p, renorm):
    B, M, D, k, scores, x = p
    got = F.fuse_tokens(x[:, 1:], scores, renorm=renorm)
    assert got.shape == (B, 1, D)
    for b in range(B):
        w = scores[b].tolist()
        total = sum(w)
        want = sum((wi / (total + 1e-6) if renorm else wi) * x[b, 1 + i] for i, wi in enumerate(w))
        torch.testing.assert_close(got[b, 0], want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(problems(), st.sampled_from([None, "raw", "renorm"]), st.booleans())
def test_keep_and_fuse_counts_provenance_and_values(p, fuse, trace):
    B, M, D, k, scores, x = p
    T = 1 + M
    size = torch.ones(B, T)
    source = torch.eye(T, dtype=torch.bool).expand(B, T, T).clone() if trace else None
    nx, nsize, nsrc, kind = F.keep_and_fuse(x, size, source, scores, k, fuse)
    fused = fuse is not None and k < M
    assert nx.shape == (B, 1 + k + int(fused), D) and nsize.shape == kind.shape == nx.shape[:2]
    assert (kind[:, 0] == CLS).all() and (kind[:, 1 : 1 + k] == KEPT).all()
    assert torch.equal(nx[:, 0], x[:, 0])  # [CLS] unchanged
    if fused:
        assert (kind[:, -1] == FUSED).all()
        torch.testing.assert_close(nsize.sum(-1), torch.full((B,), float(T)))  # sizes add up to 1 + M
    for b in range(B):
        keep, drop = python_topk(scores[b].tolist(), k)
        assert torch.equal(nx[b, 1 : 1 + k], x[b, [1 + i for i in keep]])
        if fused:
            w = [scores[b, i].item() for i in drop]
            if fuse == "renorm":
                w = [wi / (sum(w) + 1e-6) for wi in w]
            want = sum(wi * x[b, 1 + i] for wi, i in zip(w, drop))
            torch.testing.assert_close(nx[b, -1], want, atol=1e-5, rtol=1e-5)
    if trace:
        assert (nsrc.sum(1) <= 1).all()
        assert nsrc.sum().item() == B * (T if fused else 1 + k)
        torch.testing.assert_close(nsize, nsrc.sum(-1).float())
