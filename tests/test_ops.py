"""tokensieve.ops against slow, obvious references written here (float64, Python loops)."""
from __future__ import annotations

import pytest
import torch

from tokensieve import ops


def slow_fps(x: torch.Tensor, k: int, start: int) -> list[int]:
    """One row (N, D): pick the token with the largest min distance to the picks, ties to lowest index."""
    x = x.double()
    picks = [start]
    while len(picks) < k:
        best, best_dist = None, -1.0
        for i in range(x.shape[0]):
            dist = min(float(((x[i] - x[j]) ** 2).sum()) for j in picks)
            if dist > best_dist:
                best, best_dist = i, dist
        picks.append(best)
    return picks


def slow_error(x: torch.Tensor, basis: list[int], eps: float) -> torch.Tensor:
    """One row: ridge regression of each token on the basis as an augmented least-squares problem."""
    x = x.double()
    s = x[basis]  # (k, D)
    k = len(basis)
    design = torch.cat([s.T, (eps**0.5) * torch.eye(k, dtype=torch.float64)])  # (D + k, k)
    errors = []
    for token in x:
        target = torch.cat([token, torch.zeros(k, dtype=torch.float64)])
        w = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        errors.append(float((token - w @ s).norm()))
    return torch.tensor(errors, dtype=torch.float64)


def slow_apet(x: torch.Tensor, keep: int, k: int, eps: float, blend: float, merge: bool, start: int):
    """One row (N, D) -> (reduced (keep, D) float64, kept indices ascending)."""
    basis = slow_fps(x, k, start)
    error = slow_error(x, basis, eps)
    ranked = sorted(range(x.shape[0]), key=lambda i: (-float(error[i]), i))[:keep]
    anchors, slots = ranked[: keep - k], sorted(ranked[keep - k :])
    xd = x.double()
    value = {}
    for i, slot in enumerate(slots):
        value[slot] = blend * xd[basis[i]] + (1 - blend) * xd[slot]
    groups = {a: [a] for a in anchors}
    if merge:
        unit = xd / xd.norm(dim=-1, keepdim=True)
        for i in range(x.shape[0]):
            if i in ranked:
                continue
            nearest = max(anchors, key=lambda a: float(unit[i] @ unit[a]))
            groups[nearest].append(i)
    for a, members in groups.items():
        value[a] = xd[members].mean(dim=0)
    kept = sorted(ranked)
    return torch.stack([value[i] for i in kept]), kept


@pytest.fixture
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 40, 16, generator=generator)


def test_fps_matches_reference(tokens):
    picks = ops.farthest_point_sample(tokens, 6, start=torch.tensor([0, 5, 39]))
    for row, start in zip(range(3), (0, 5, 39)):
        assert picks[row].tolist() == slow_fps(tokens[row], 6, start)


def test_fps_default_start_is_farthest_from_mean(tokens):
    picks = ops.farthest_point_sample(tokens, 3)
    for row in range(3):
        x = tokens[row].double()
        expected = int(((x - x.mean(0)) ** 2).sum(-1).argmax())
        assert picks[row, 0] == expected
        assert picks[row].tolist() == slow_fps(tokens[row], 3, expected)


def test_approximation_error_matches_reference(tokens):
    basis = ops.farthest_point_sample(tokens, 5, start=0)
    errors = ops.approximation_error(tokens, basis, eps=1e-3)
    for row in range(3):
        torch.testing.assert_close(errors[row].double(), slow_error(tokens[row], basis[row].tolist(), 1e-3), rtol=1e-4, atol=1e-4)
        assert errors[row, basis[row]].max() < 1e-2  # basis tokens reconstruct themselves


@pytest.mark.parametrize("blend,merge", [(1.0, True), (0.5, True), (1.0, False), (0.0, True)])
def test_apet_reduce_matches_reference(tokens, blend, merge):
    reduced, kept = ops.apet_reduce(tokens, keep=12, num_basis=4, eps=1e-5, basis_blend=blend, merge=merge, start=2)
    assert reduced.shape == (3, 12, 16) and reduced.dtype == tokens.dtype
    for row in range(3):
        expected, expected_kept = slow_apet(tokens[row], 12, 4, 1e-5, blend, merge, start=2)
        assert kept[row].tolist() == expected_kept
        torch.testing.assert_close(reduced[row].double(), expected, rtol=1e-5, atol=1e-5)


def test_apet_keep_all_is_identity(tokens):
    reduced, kept = ops.apet_reduce(tokens, keep=40, num_basis=4)
    assert torch.equal(reduced, tokens)
    assert torch.equal(kept, torch.arange(40).expand(3, -1))


@pytest.mark.parametrize("keep", [4, 3, 41])
def test_apet_rejects_bad_keep(tokens, keep):
    with pytest.raises(ValueError, match="keep must be in"):
        ops.apet_reduce(tokens, keep=keep, num_basis=4)


def test_apet_is_deterministic_and_batch_invariant(tokens):
    _, kept_batch = ops.apet_reduce(tokens, keep=12, num_basis=4)
    for row in range(3):
        _, kept_alone = ops.apet_reduce(tokens[row : row + 1], keep=12, num_basis=4)
        assert torch.equal(kept_alone[0], kept_batch[row])
    assert torch.equal(ops.apet_reduce(tokens, keep=12, num_basis=4)[1], kept_batch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_do_not_overflow(dtype):
    """Activations of a few hundred squared over D=1024 overflow fp16 (max 65504) if done in half."""
    generator = torch.Generator().manual_seed(1)
    x32 = (300 * torch.randn(2, 64, 1024, generator=generator))
    x = x32.to(dtype)
    picks = ops.farthest_point_sample(x, 8, start=0)
    assert torch.equal(picks, ops.farthest_point_sample(x.float(), 8, start=0))
    errors = ops.approximation_error(x, picks)
    assert errors.dtype == torch.float32 and torch.isfinite(errors).all()
    reduced, kept = ops.apet_reduce(x, keep=20, num_basis=8, start=0)
    assert reduced.dtype == dtype and torch.isfinite(reduced.float()).all()
    assert torch.equal(kept, ops.apet_reduce(x.float(), keep=20, num_basis=8, start=0)[1])


def test_compact_rows_left_pads_kept_rows():
    from tokensieve.runtime.sequence import compact_rows

    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    selection = compact_rows(keep)
    x = torch.arange(10).view(2, 5)
    gathered = selection.gather(x, 1)
    assert gathered[0].tolist() == [0, 2, 3]
    assert gathered[1, 2].item() == 6 and selection.valid.tolist() == [[True] * 3, [False, False, True]]


# ---------------------------------------------------------------------------- ALVTS scores
def slow_alvts_scores(q, k, item, valid, v2v_rows: str = "all") -> torch.Tensor:
    """Loops: per row, head and query, a softmax over the keys it may see; then S_V2V * S_T2V per visual token.

    v2v_rows "all": S_V2V(i) is the mean over every row of i's image; "attending": the sum over them
    divided by the rows of the image at or after i (the only ones whose attention can reach i)."""
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, length)
    for b in range(batch):
        attention = torch.zeros(length, length)
        for h in range(heads):
            for j in range(length):
                keys = [i for i in range(j + 1) if valid[b, i]]
                if not valid[b, j] or not keys:
                    continue
                logits = torch.stack([q[b, h, j] @ k[b, h // group, i] / dim ** 0.5 for i in keys])
                attention[j, keys] += logits.softmax(0) / heads
        text = [j for j in range(length) if valid[b, j] and item[b, j] < 0]
        for i in range(length):
            if item[b, i] < 0 or not valid[b, i]:
                continue
            own = [j for j in range(length) if valid[b, j] and item[b, j] == item[b, i]]
            divisor = len(own) if v2v_rows == "all" else len([j for j in own if j >= i])
            out[b, i] = attention[own, i].sum() / divisor * (attention[text, i].mean() if text else 0.0)
    return out


@pytest.mark.parametrize("v2v_rows", ["all", "attending"])
@pytest.mark.parametrize("rows_per_chunk", [1, 5, 12])
def test_alvts_scores_equal_the_loop_reference(rows_per_chunk, v2v_rows, monkeypatch):
    from tokensieve.ops import alvts as alvts_ops
    from tokensieve.ops.alvts import alvts_scores

    monkeypatch.setattr(alvts_ops, "CHUNK_ELEMENTS", rows_per_chunk * 2 * 4 * 12)  # batch x heads x length per row

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)  # grouped-query keys
    item = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1],   # two images in row 0
                         [-1, -1, -1, -1, -1, 2, 2, 2, 2, -1, -1, -1]])  # left padding in row 1
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    got = alvts_scores(q, k, item, valid, v2v_rows=v2v_rows)
    torch.testing.assert_close(got, slow_alvts_scores(q, k, item, valid, v2v_rows), rtol=1e-5, atol=1e-7)
    assert (got[item < 0] == 0).all() and (got[item >= 0] > 0).all()
    torch.testing.assert_close(alvts_scores(q, k, item, valid, max_items=2, v2v_rows=v2v_rows), got)  # no device read


def test_attending_v2v_divides_each_token_by_the_rows_after_it():
    """Three image rows: the first token's V2V sum is divided by 3 either way, the last one's by 3 ("all")
    or by 1 ("attending"): the ratio of the two readings is N / (rows at or after i)."""
    from tokensieve.ops.alvts import alvts_scores

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    item = torch.tensor([[-1, 0, 0, 0, -1, -1]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    ratio = alvts_scores(q, k, item, valid, v2v_rows="attending") / alvts_scores(q, k, item, valid)
    torch.testing.assert_close(ratio[0, 1:4], torch.tensor([1.0, 1.5, 3.0]))
