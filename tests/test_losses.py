"""splitformer.losses (torch backend) against brute-force RNN-T written here with plain loops over (t, u)."""
import argparse
import math

import pytest
import torch

from splitformer import losses
from splitformer.losses import rnnt as R
from splitformer.losses.mutual_information import mutual_information_recursion

torch.set_num_threads(1)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Brute-force references: the textbook definitions, one utterance at a time, float64.
# ----------------------------------------------------------------------------------------------------------------
def _lae(a: float, b: float) -> float:
    if a == -math.inf and b == -math.inf:
        return -math.inf
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def brute_rnnt_logprob(logp: torch.Tensor, ys, blank: int, rnnt_type: str) -> float:
    """log P(ys | x) for one utterance; logp is (T, U+1, V) log-softmaxed joiner output."""
    T, U = logp.shape[0], len(ys)
    lp = logp.tolist()
    if rnnt_type == "regular":
        # alpha[t][u]: emitted u symbols and standing on frame t.
        alpha = [[-math.inf] * (U + 1) for _ in range(T)]
        for t in range(T):
            for u in range(U + 1):
                if t == 0 and u == 0:
                    alpha[t][u] = 0.0
                    continue
                stay = alpha[t - 1][u] + lp[t - 1][u][blank] if t > 0 else -math.inf
                emit = alpha[t][u - 1] + lp[t][u - 1][ys[u - 1]] if u > 0 else -math.inf
                alpha[t][u] = _lae(stay, emit)
        return alpha[T - 1][U] + lp[T - 1][U][blank]
    # modified: every frame emits exactly one token (blank or a symbol); alpha[t][u] after t frames.
    alpha = [[-math.inf] * (U + 1) for _ in range(T + 1)]
    alpha[0][0] = 0.0
    for t in range(1, T + 1):
        for u in range(U + 1):
            blank_in = alpha[t - 1][u] + lp[t - 1][u][blank]
            emit = alpha[t - 1][u - 1] + lp[t - 1][u - 1][ys[u - 1]] if u > 0 else -math.inf
            alpha[t][u] = _lae(blank_in, emit)
    return alpha[T][U]


def brute_batch(logits: torch.Tensor, symbols, t_lens, u_lens, blank: int, rnnt_type: str) -> torch.Tensor:
    out = []
    for b in range(logits.shape[0]):
        T, U = int(t_lens[b]), int(u_lens[b])
        logp = logits[b, :T, : U + 1].log_softmax(-1)
        out.append(-brute_rnnt_logprob(logp, symbols[b, :U].tolist(), blank, rnnt_type))
    return torch.tensor(out, dtype=F64)


def random_batch(B=4, T=7, U=4, V=6, seed=0, modified=False):
    g = torch.Generator().manual_seed(seed)
    t_lens = torch.randint(max(2, T // 2), T + 1, (B,), generator=g)
    t_lens[0] = T
    u_lens = torch.randint(1, U + 1, (B,), generator=g)
    u_lens[1] = U
    if modified:
        u_lens = torch.minimum(u_lens, t_lens)
    symbols = torch.randint(1, V, (B, U), generator=g)
    am = torch.randn(B, T, V, generator=g, dtype=F64)
    lm = torch.randn(B, U + 1, V, generator=g, dtype=F64)
    boundary = torch.stack([torch.zeros_like(u_lens), torch.zeros_like(u_lens), u_lens, t_lens], 1)
    return am, lm, symbols, boundary


def joiner(am: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in joiner (so that pruned != simple), applied to broadcastable am/lm."""
    return torch.tanh(am + lm) * 3.0 + 0.5 * am


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_full_loss_matches_brute_force(rnnt_type):
    am, lm, symbols, boundary = random_batch(B=4, T=7, U=4, seed=1, modified=rnnt_type == "modified")
    logits = joiner(am[:, :, None], lm[:, None])
    got = R.rnnt_loss(logits, symbols, 0, boundary=boundary, rnnt_type=rnnt_type, reduction="none")
    ref = brute_batch(logits, symbols, boundary[:, 3], boundary[:, 2], 0, rnnt_type)
    assert got.dtype == F64
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.allclose(R.rnnt_loss(logits, symbols, 0, boundary, rnnt_type, reduction="sum"), ref.sum(), atol=1e-6)
    assert torch.allclose(R.rnnt_loss(logits, symbols, 0, boundary, rnnt_type, reduction="mean"), ref.mean(), atol=1e-6)


@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_simple_loss_matches_brute_force(rnnt_type):
    am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, seed=2, modified=rnnt_type == "modified")
    got = R.rnnt_loss_simple(lm, am, symbols, 0, boundary=boundary, rnnt_type=rnnt_type, reduction="none")
    ref = brute_batch(am[:, :, None] + lm[:, None], symbols, boundary[:, 3], boundary[:, 2], 0, rnnt_type)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # Smoothed with both extra scales at zero is the simple loss.
    sm = R.rnnt_loss_smoothed(lm, am, symbols, 0, 0.0, 0.0, boundary, rnnt_type, reduction="none")
    torch.testing.assert_close(sm, ref, atol=1e-6, rtol=0)


def test_smoothed_loss_is_the_interpolation_it_claims():
    """lm_only_scale=1 is the RNN-T loss of a joiner that ignores the encoder (logits = lm only)."""
    am, lm, symbols, boundary = random_batch(B=3, T=5, U=3, seed=3)
    got = R.rnnt_loss_smoothed(lm, am, symbols, 0, lm_only_scale=1.0, am_only_scale=0.0,
                               boundary=boundary, reduction="none")
    ref = brute_batch(lm[:, None].expand(-1, am.shape[1], -1, -1), symbols, boundary[:, 3], boundary[:, 2], 0, "regular")
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_recursion_gradcheck(rnnt_type):
    g = torch.Generator().manual_seed(4)
    B, S, T = 3, 3, 4
    px = torch.randn(B, S, T + (rnnt_type == "regular"), dtype=F64, generator=g, requires_grad=True)
    py = torch.randn(B, S + 1, T, dtype=F64, generator=g, requires_grad=True)
    boundary = torch.tensor([[0, 0, 3, 4], [0, 1, 2, 4], [1, 0, 3, 3]])
    assert torch.autograd.gradcheck(lambda a, b: mutual_information_recursion(a, b, boundary), (px, py))
    assert torch.autograd.gradcheck(lambda a, b: mutual_information_recursion(a, b), (px, py))


def test_recursion_return_grad_is_occupation():
    """return_grad gives d scores.sum() / d (px, py); along any lattice the occupations of a column sum to 1."""
    g = torch.Generator().manual_seed(5)
    px = torch.randn(2, 4, 6, dtype=F64, generator=g, requires_grad=True)
    py = torch.randn(2, 5, 5, dtype=F64, generator=g, requires_grad=True)
    scores, (gx, gy) = mutual_information_recursion(px, py, return_grad=True)
    ax, ay = torch.autograd.grad(scores.sum(), (px, py))
    torch.testing.assert_close(gx, ax)
    torch.testing.assert_close(gy, ay)
    # Every path makes exactly T blank moves (py) and S symbol moves (px).
    torch.testing.assert_close(gy.sum((1, 2)), torch.full((2,), 5.0, dtype=F64))
    torch.testing.assert_close(gx.sum((1, 2)), torch.full((2,), 4.0, dtype=F64))


@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_pruned_loss_gradcheck(rnnt_type):
    am, lm, symbols, boundary = random_batch(B=3, T=4, U=3, V=5, seed=6, modified=rnnt_type == "modified")
    _, (gx, gy) = R.rnnt_loss_simple(lm, am, symbols, 0, boundary, rnnt_type, reduction="sum", return_grad=True)
    ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range=2)
    am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
    logits = joiner(am_p, lm_p).detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: R.rnnt_loss_pruned(x, symbols, ranges, 0, boundary, rnnt_type, reduction="none"), (logits,)
    )


@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_wide_pruning_equals_full_loss(rnnt_type):
    am, lm, symbols, boundary = random_batch(B=4, T=8, U=4, seed=7, modified=rnnt_type == "modified")
    am.requires_grad_()
    lm.requires_grad_()
    simple, (gx, gy) = R.rnnt_loss_smoothed(lm, am, symbols, 0, 0.25, 0.0, boundary, rnnt_type,
                                            reduction="sum", return_grad=True)
    U = symbols.shape[1]
    for s_range in (U + 1, U + 3):
        ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range)
        assert ranges.shape == (4, 8, U + 1)  # capped at S + 1
        am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
        pruned = R.rnnt_loss_pruned(joiner(am_p, lm_p), symbols, ranges, 0, boundary, rnnt_type, reduction="none")
        full = R.rnnt_loss(joiner(am[:, :, None], lm[:, None]), symbols, 0, boundary, rnnt_type, reduction="none")
        torch.testing.assert_close(pruned, full, atol=1e-10, rtol=0)
        ga = torch.autograd.grad(pruned.sum(), (am, lm))
        gb = torch.autograd.grad(full.sum(), (am, lm))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_narrow_pruning_is_an_upper_bound_and_ranges_are_valid():
    am, lm, symbols, boundary = random_batch(B=4, T=10, U=6, seed=8)
    _, (gx, gy) = R.rnnt_loss_simple(lm, am, symbols, 0, boundary, reduction="sum", return_grad=True)
    ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range=3)
    assert ranges.shape == (4, 10, 3)
    diffs = ranges[:, 1:, 0] - ranges[:, :-1, 0]
    assert (diffs >= 0).all() and (diffs <= 2).all()  # monotonic, overlapping windows
    assert (ranges[:, 0, 0] == 0).all()
    for b in range(4):  # the last frame's window reaches the end of the transcript
        T_b, U_b = int(boundary[b, 3]), int(boundary[b, 2])
        assert ranges[b, T_b - 1, 0] <= U_b <= ranges[b, T_b - 1, -1]
    am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
    pruned = R.rnnt_loss_pruned(joiner(am_p, lm_p), symbols, ranges, 0, boundary, reduction="none")
    full = R.rnnt_loss(joiner(am[:, :, None], lm[:, None]), symbols, 0, boundary, reduction="none")
    assert torch.isfinite(pruned).all()
    assert (pruned >= full - 1e-9).all()  # fewer paths: never a smaller loss


# ----------------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
def test_empty_transcripts(rnnt_type):
    """U = 0: the loss is the sum of blank log-probs; both a whole batch with S = 0 and U_b = 0 in a batch."""
    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 5, 6
    am = torch.randn(B, T, V, dtype=F64, generator=g)
    lm = torch.randn(B, 1, V, dtype=F64, generator=g)
    symbols = torch.zeros(B, 0, dtype=torch.int64)
    t_lens = torch.tensor([5, 3, 1])
    boundary = torch.stack([torch.zeros(B, dtype=torch.int64)] * 3 + [t_lens], 1)
    logits = joiner(am[:, :, None], lm[:, None])
    ref = brute_batch(logits, symbols, t_lens, [0, 0, 0], 0, rnnt_type)
    torch.testing.assert_close(R.rnnt_loss(logits, symbols, 0, boundary, rnnt_type, reduction="none"), ref)
    simple, (gx, gy) = R.rnnt_loss_simple(lm, am, symbols, 0, boundary, rnnt_type, reduction="none", return_grad=True)
    ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range=5)
    assert ranges.shape == (B, T, 1) and (ranges == 0).all()
    am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
    pruned = R.rnnt_loss_pruned(joiner(am_p, lm_p), symbols, ranges, 0, boundary, rnnt_type, reduction="none")
    torch.testing.assert_close(pruned, ref)
    # ... and through the dispatcher, whatever the backend (k2/fast_rnnt reject S = 0, so torch runs).
    torch.testing.assert_close(losses.rnnt_loss(logits, symbols, 0, boundary, rnnt_type, reduction="none"), ref)

    # One empty transcript inside a normal batch.
    am2, lm2, sym2, bd2 = random_batch(B=3, T=6, U=3, seed=10)
    bd2[2, 2] = 0
    logits2 = joiner(am2[:, :, None], lm2[:, None])
    got = R.rnnt_loss(logits2, sym2, 0, bd2, rnnt_type, reduction="none")
    torch.testing.assert_close(got, brute_batch(logits2, sym2, bd2[:, 3], bd2[:, 2], 0, rnnt_type), atol=1e-6, rtol=0)


def test_single_frame():
    """T = 1: regular RNN-T emits everything on the one frame; modified can emit at most one symbol."""
    g = torch.Generator().manual_seed(11)
    am = torch.randn(3, 1, 5, dtype=F64, generator=g)
    lm = torch.randn(3, 3, 5, dtype=F64, generator=g)
    symbols = torch.tensor([[1, 2], [4, 4], [3, 1]])
    boundary = torch.tensor([[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    logits = joiner(am[:, :, None], lm[:, None])
    ref = brute_batch(logits, symbols, boundary[:, 3], boundary[:, 2], 0, "regular")
    torch.testing.assert_close(R.rnnt_loss(logits, symbols, 0, boundary, reduction="none"), ref)
    _, (gx, gy) = R.rnnt_loss_simple(lm, am, symbols, 0, boundary, reduction="sum", return_grad=True)
    ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range=2)  # too small for U=2 on one frame: widened
    assert ranges.shape[2] == 3
    am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
    torch.testing.assert_close(
        R.rnnt_loss_pruned(joiner(am_p, lm_p), symbols, ranges, 0, boundary, reduction="none"), ref)
    bd_mod = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    ref_mod = brute_batch(logits, symbols, bd_mod[:, 3], bd_mod[:, 2], 0, "modified")
    torch.testing.assert_close(R.rnnt_loss(logits, symbols, 0, bd_mod, "modified", reduction="none"), ref_mod)
    with pytest.raises(ValueError, match="T >= U"):
        R.rnnt_loss(logits, symbols, 0, boundary, "modified")


def test_symbols_at_vocabulary_edges_and_blank_last():
    am, lm, _, boundary = random_batch(B=3, T=6, U=3, V=7, seed=12)
    V = 7
    symbols = torch.tensor([[1, 6, 6], [6, 1, 1], [1, 1, 6]])
    logits = joiner(am[:, :, None], lm[:, None])
    for blank, syms in ((0, symbols), (6, symbols - 1)):  # blank first (ids 1..V-1) or last (ids 0..V-2)
        got = R.rnnt_loss(logits, syms, blank, boundary, reduction="none")
        torch.testing.assert_close(got, brute_batch(logits, syms, boundary[:, 3], boundary[:, 2], blank, "regular"),
                                   atol=1e-6, rtol=0)
        simple = R.rnnt_loss_simple(lm, am, syms, blank, boundary, reduction="none")
        ref = brute_batch(am[:, :, None] + lm[:, None], syms, boundary[:, 3], boundary[:, 2], blank, "regular")
        torch.testing.assert_close(simple, ref, atol=1e-6, rtol=0)
    assert symbols.max() == V - 1


def test_minus_inf_inputs():
    """-inf log-probs for unused tokens give the same loss with no nan anywhere; an impossible utterance
    gives an infinite loss and a zero (not nan) gradient."""
    am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, V=6, seed=13)
    symbols = symbols.clamp(max=4)
    logits = joiner(am[:, :, None], lm[:, None]).detach()
    masked = logits.clone()
    masked[..., 5] = -math.inf  # token 5 is never in the transcripts
    masked.requires_grad_()
    got = R.rnnt_loss(masked, symbols, 0, boundary, reduction="none")
    ref = brute_batch(masked.detach(), symbols, boundary[:, 3], boundary[:, 2], 0, "regular")
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(got.sum(), masked)
    assert not torch.isnan(g).any()

    impossible = logits.clone()
    impossible[1, ..., 0] = -math.inf  # utterance 1 can never emit blank
    impossible.requires_grad_()
    got = R.rnnt_loss(impossible, symbols, 0, boundary, reduction="none")
    assert math.isinf(got[1].item()) and torch.isfinite(got[[0, 2]]).all()
    (g,) = torch.autograd.grad(got[[0, 2]].sum() + 0 * got[1], impossible)
    assert not torch.isnan(g).any() and (g[1] == 0).all()

    # -inf px/py directly in the recursion
    px = torch.full((2, 2, 4), -math.inf, dtype=F64)
    py = torch.zeros(2, 3, 3, dtype=F64)
    scores, (gx, gy) = mutual_information_recursion(px, py, return_grad=True)
    assert torch.isinf(scores).all() and (gx == 0).all() and (gy == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, seed=14)
    am_h, lm_h = am.to(dtype), lm.to(dtype)
    am_32, lm_32 = am_h.float(), lm_h.float()
    simple_h, (gx, gy) = R.rnnt_loss_smoothed(lm_h, am_h, symbols, 0, 0.25, 0.0, boundary, reduction="none",
                                              return_grad=True)
    simple_32 = R.rnnt_loss_smoothed(lm_32, am_32, symbols, 0, 0.25, 0.0, boundary, reduction="none")
    assert simple_h.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(simple_h, simple_32)
    ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, 3)
    am_p, lm_p = R.do_rnnt_pruning(am_h, lm_h, ranges)
    logits_h = (am_p + lm_p).requires_grad_()
    pruned_h = R.rnnt_loss_pruned(logits_h, symbols, ranges, 0, boundary, reduction="sum")
    pruned_32 = R.rnnt_loss_pruned(logits_h.detach().float(), symbols, ranges, 0, boundary, reduction="sum")
    assert pruned_h.dtype == torch.float32
    torch.testing.assert_close(pruned_h, pruned_32)
    (g,) = torch.autograd.grad(pruned_h, logits_h)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()
    # The dispatcher upcasts for every backend.
    assert losses.rnnt_loss_pruned(logits_h, symbols, ranges, 0, boundary, reduction="sum").dtype == torch.float32


def test_bad_arguments_name_the_problem():
    am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, seed=15)
    with pytest.raises(ValueError, match="reduction"):
        R.rnnt_loss_simple(lm, am, symbols, 0, boundary, reduction="avg")
    with pytest.raises(ValueError, match="rnnt_type"):
        R.rnnt_loss_simple(lm, am, symbols, 0, boundary, rnnt_type="fancy")
    with pytest.raises(ValueError, match="symbols"):
        R.rnnt_loss_simple(lm, am, symbols[:, :2], 0, boundary)
    with pytest.raises(ValueError, match="boundary"):
        mutual_information_recursion(torch.zeros(3, 3, 7), torch.zeros(3, 4, 6), torch.tensor([[0, 0, 4, 6]] * 3))


# ----------------------------------------------------------------------------------------------------------------
# CTC and the backend switch
# ----------------------------------------------------------------------------------------------------------------
def test_ctc_loss_matches_torch_and_counts_infinities():
    g = torch.Generator().manual_seed(16)
    B, T, V = 4, 6, 5
    log_probs = torch.randn(B, T, V, dtype=F64, generator=g).log_softmax(-1).requires_grad_()
    lens = torch.tensor([6, 5, 2, 4])
    targets = [[1, 2, 3], [4], [1, 1, 2], []]  # utterance 2 needs >= 4 frames but has 2
    loss, num_inf = losses.ctc_loss(log_probs, lens, targets, blank=0, reduction="none")
    assert num_inf == 1 and loss[2] == 0
    for b in (0, 1, 3):
        ref = torch.nn.functional.ctc_loss(log_probs[b, : lens[b]].unsqueeze(1), torch.tensor([targets[b]]),
                                           lens[b: b + 1], torch.tensor([len(targets[b])]), reduction="sum")
        torch.testing.assert_close(loss[b], ref)
    total, n = losses.ctc_loss(log_probs, lens, targets, reduction="sum")
    assert n == 1 and torch.isclose(total, loss.sum())
    (grad,) = torch.autograd.grad(total, log_probs)
    assert torch.isfinite(grad).all() and (grad[2] == 0).all()
    mean, _ = losses.ctc_loss(log_probs.float(), lens, targets, reduction="mean")
    assert torch.isclose(mean, total.float() / B)
    half, _ = losses.ctc_loss(log_probs.detach().half(), lens, targets[:2] + [[1], [2]], reduction="sum")
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_backend_switch(caplog):
    parser = argparse.ArgumentParser()
    losses.add_arguments(parser)
    assert parser.parse_args([]).rnnt_backend == "auto"
    assert parser.parse_args(["--rnnt-backend", "torch"]).rnnt_backend == "torch"
    with pytest.raises(ValueError):
        losses.set_backend("cuda")
    try:
        losses.set_backend("torch")
        with caplog.at_level("INFO"):
            assert losses.get_backend() == "torch"
            assert losses.get_backend() == "torch"
        assert sum("RNN-T loss backend: torch" in r.getMessage() for r in caplog.records) == 1  # logged once
        am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, seed=17)
        torch.testing.assert_close(losses.rnnt_loss_simple(lm, am, symbols, 0, boundary, reduction="none"),
                                   R.rnnt_loss_simple(lm, am, symbols, 0, boundary, reduction="none"))
        losses.set_backend("auto")
        assert losses.get_backend() in ("k2", "fast_rnnt", "torch")
    finally:
        losses.set_backend("auto")


@pytest.mark.parametrize("regular", [True, False])
def test_strided_and_gather_layouts_agree(regular):
    """The fast as_strided skew (lattices starting at (0, 0)) equals the general index-gather one."""
    from splitformer.losses.mutual_information import _GatherLayout, _StridedLayout

    g = torch.Generator().manual_seed(18)
    B, S, T = 4, 6, 9
    px = torch.randn(B, S, T + regular, generator=g)
    py = torch.randn(B, S + 1, T, generator=g)
    for bd in (None, torch.tensor([[0, 0, 6, 9], [0, 0, 3, 9], [0, 0, 6, 7], [0, 0, 0, 6]])):
        a, b = _GatherLayout(B, S, T, regular, bd, px.device), _StridedLayout(B, S, T, regular, bd, px.device)
        (ax, ay), (bx, by) = a.skew(px, py), b.skew(px, py)
        assert torch.equal(ax, bx) and torch.equal(ay, by)
        gx = torch.where(torch.isfinite(ax[:, :, :-1]), torch.rand(ax[:, :, :-1].shape, generator=g), 0.0)
        gy = torch.where(torch.isfinite(ay), torch.rand(ay.shape, generator=g), 0.0)
        for u, v in zip(a.unskew(gx, gy), b.unskew(gx, gy)):
            assert torch.equal(u, v)


def test_icefall_call_sequence_trains_a_tiny_transducer():
    """The exact keyword calls of icefall's model.py (k2 -> splitformer.losses), with projections to a joiner
    dim != vocab; a few SGD steps on one batch must lower both losses."""
    torch.manual_seed(19)
    B, T, U, V, J = 3, 12, 4, 8, 6
    enc = torch.randn(B, T, 5)
    dec_in = torch.randn(B, U + 1, 5)
    y_padded = torch.randint(1, V, (B, U))
    boundary = torch.tensor([[0, 0, 4, 12], [0, 0, 2, 9], [0, 0, 3, 10]])
    am_lin, lm_lin = torch.nn.Linear(5, V), torch.nn.Linear(5, V)
    enc_proj, dec_proj, out = torch.nn.Linear(5, J), torch.nn.Linear(5, J), torch.nn.Linear(J, V)
    params = [p for m in (am_lin, lm_lin, enc_proj, dec_proj, out) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    history = []
    for _ in range(15):
        simple_loss, (px_grad, py_grad) = losses.rnnt_loss_smoothed(
            lm=lm_lin(dec_in).float(), am=am_lin(enc).float(), symbols=y_padded, termination_symbol=0,
            lm_only_scale=0.25, am_only_scale=0.0, boundary=boundary, reduction="sum", return_grad=True)
        ranges = losses.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=3)
        am_pruned, lm_pruned = losses.do_rnnt_pruning(am=enc_proj(enc), lm=dec_proj(dec_in), ranges=ranges)
        assert am_pruned.shape == lm_pruned.shape == (B, T, 3, J)
        logits = out(torch.tanh(am_pruned + lm_pruned))
        pruned_loss = losses.rnnt_loss_pruned(logits=logits.float(), symbols=y_padded, ranges=ranges,
                                              termination_symbol=0, boundary=boundary, reduction="sum")
        history.append((simple_loss.item(), pruned_loss.item()))
        opt.zero_grad()
        (0.5 * simple_loss + pruned_loss).backward()
        opt.step()
    assert history[-1][0] < 0.9 * history[0][0] and history[-1][1] < 0.9 * history[0][1], history


def test_cuda_tensors_skip_cpu_only_builds():
    from types import SimpleNamespace

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert losses._has_device(SimpleNamespace(with_cuda=lambda: False), cpu)  # fast_rnnt: a function
    assert not losses._has_device(SimpleNamespace(with_cuda=lambda: False), cuda)
    assert losses._has_device(SimpleNamespace(with_cuda=True), cuda)  # k2: a bool
    assert not losses._has_device(SimpleNamespace(), cuda)


def test_all_minus_inf_logit_rows_give_no_nan():
    am, lm, symbols, boundary = random_batch(B=3, T=6, U=3, seed=20)
    logits = joiner(am[:, :, None], lm[:, None]).detach()
    logits[0, 2, 1, :] = -math.inf  # one whole lattice cell has no probability mass
    logits.requires_grad_()
    loss = R.rnnt_loss(logits, symbols, 0, boundary, reduction="none")
    logp = logits.detach().log_softmax(-1)
    logp[0, 2, 1, :] = -math.inf  # log_softmax itself would give nan there
    ref = [-brute_rnnt_logprob(logp[b, : boundary[b, 3], : boundary[b, 2] + 1], symbols[b, : boundary[b, 2]].tolist(),
                               0, "regular") for b in range(3)]
    torch.testing.assert_close(loss, torch.tensor(ref, dtype=F64), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert not torch.isnan(g).any() and (g[0, 2, 1] == 0).all()
