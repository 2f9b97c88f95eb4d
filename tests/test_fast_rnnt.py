"""The torch backend against fast_rnnt's C++ (k2's pruned RNN-T, packaged alone), float32, to 1e-5.

fast_rnnt is built by tools/install_fast_rnnt.sh. Under CI (CI=true) it must be there; elsewhere the test
skips and says why.
"""
import os

import pytest
import torch

from splitformer import losses
from splitformer.losses import rnnt as R
from splitformer.losses.mutual_information import mutual_information_recursion

torch.set_num_threads(1)

try:
    import fast_rnnt
except Exception as e:  # ImportError or a stale binary build
    fast_rnnt = None
    _why = f"fast_rnnt not importable ({e}); build it with tools/install_fast_rnnt.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

TOL = dict(atol=1e-5, rtol=1e-5)
TYPES = ["regular", "modified", "constrained"]


def _inputs(seed: int, B=5, T=30, U=8, V=20, rnnt_type="regular"):
    g = torch.Generator().manual_seed(seed)
    t_lens = torch.randint(U + 2, T + 1, (B,), generator=g)
    t_lens[0] = T
    u_lens = torch.randint(1, U + 1, (B,), generator=g)
    u_lens[1] = U
    symbols = torch.randint(1, V, (B, U), generator=g)
    symbols[0, 0], symbols[-1, -1] = 1, V - 1  # vocabulary edges
    am = torch.randn(B, T, V, generator=g) * 2
    lm = torch.randn(B, U + 1, V, generator=g) * 2
    zeros = torch.zeros_like(u_lens)
    return am, lm, symbols, torch.stack([zeros, zeros, u_lens, t_lens], 1)


def _joiner(am, lm):
    return torch.tanh(am + lm) * 4.0


@pytest.mark.parametrize("modified", [False, True])
def test_recursion_matches(modified):
    g = torch.Generator().manual_seed(0)
    B, S, T = 4, 7, 12
    px = torch.randn(B, S, T if modified else T + 1, generator=g)
    py = torch.randn(B, S + 1, T, generator=g)
    boundary = torch.tensor([[0, 0, 7, 12], [1, 2, 6, 10], [0, 3, 4, 12], [2, 0, 7, 9]])
    for bd in (None, boundary):
        ours, (gx, gy) = mutual_information_recursion(px, py, bd, return_grad=True)
        ref, (rx, ry) = fast_rnnt.mutual_information_recursion(px, py, bd, return_grad=True)
        torch.testing.assert_close(ours, ref, **TOL)
        torch.testing.assert_close(gx, rx, **TOL)
        torch.testing.assert_close(gy, ry, **TOL)


@pytest.mark.parametrize("rnnt_type", TYPES)
def test_pruned_recipe_matches(rnnt_type):
    """Every step icefall takes: smoothed simple loss + grads, ranges, pruning, pruned loss + grads; and the
    simple and full-lattice losses; regular, modified and constrained."""
    am, lm, symbols, boundary = _inputs(1 + TYPES.index(rnnt_type), rnnt_type=rnnt_type)
    for fn, extra in (("rnnt_loss_simple", {}), ("rnnt_loss_smoothed", dict(lm_only_scale=0.25, am_only_scale=0.1)),
                      ("rnnt_loss_simple", dict(delay_penalty=0.05))):
        kw = dict(lm=lm, am=am, symbols=symbols, termination_symbol=0, boundary=boundary, rnnt_type=rnnt_type,
                  reduction="none", return_grad=True, **extra)
        ours, (gx, gy) = getattr(R, fn)(**kw)
        ref, (rx, ry) = getattr(fast_rnnt, fn)(**kw)
        torch.testing.assert_close(ours, ref, **TOL)
        torch.testing.assert_close(gx, rx, **TOL)
        torch.testing.assert_close(gy, ry, **TOL)

    for s_range in (2, 4, 20):
        ranges = R.get_rnnt_prune_ranges(gx, gy, boundary, s_range)
        assert torch.equal(ranges, fast_rnnt.get_rnnt_prune_ranges(gx, gy, boundary, s_range))
        am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges)
        ram_p, rlm_p = fast_rnnt.do_rnnt_pruning(am, lm, ranges)
        assert torch.equal(am_p, ram_p) and torch.equal(lm_p, rlm_p)
        logits = _joiner(am_p, lm_p).requires_grad_()
        for reduction in ("none", "sum", "mean"):
            ours = R.rnnt_loss_pruned(logits, symbols, ranges, 0, boundary, rnnt_type, reduction=reduction)
            ref = fast_rnnt.rnnt_loss_pruned(logits, symbols, ranges, 0, boundary, rnnt_type, reduction=reduction)
            torch.testing.assert_close(ours, ref, **TOL)
        (g_ours,) = torch.autograd.grad(ours, logits)
        (g_ref,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g_ours, g_ref, **TOL)

    full = _joiner(am[:, :, None], lm[:, None]).requires_grad_()
    ours = R.rnnt_loss(full, symbols, 0, boundary, rnnt_type, reduction="sum")
    ref = fast_rnnt.rnnt_loss(full, symbols, 0, boundary, rnnt_type, reduction="sum")
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, full)[0], torch.autograd.grad(ref, full)[0], **TOL)


def test_dispatcher_uses_fast_rnnt_and_agrees():
    am, lm, symbols, boundary = _inputs(7)
    try:
        losses.set_backend("fast_rnnt")
        assert losses.get_backend() == "fast_rnnt"
        got, (gx, gy) = losses.rnnt_loss_smoothed(lm, am, symbols, 0, 0.25, 0.0, boundary, reduction="sum",
                                                  return_grad=True)
        ranges = losses.get_rnnt_prune_ranges(gx, gy, boundary, 5)
        am_p, lm_p = losses.do_rnnt_pruning(am, lm, ranges)
        pruned = losses.rnnt_loss_pruned(_joiner(am_p, lm_p).half(), symbols, ranges, 0, boundary, reduction="sum")
        losses.set_backend("torch")
        ref = losses.rnnt_loss_smoothed(lm, am, symbols, 0, 0.25, 0.0, boundary, reduction="sum")
        ref_pruned = losses.rnnt_loss_pruned(_joiner(am_p, lm_p).half(), symbols, ranges, 0, boundary, reduction="sum")
    finally:
        losses.set_backend("auto")
    torch.testing.assert_close(got, ref, **TOL)
    assert pruned.dtype == torch.float32
    torch.testing.assert_close(pruned, ref_pruned, **TOL)


@pytest.mark.parametrize("rnnt_type", TYPES)
def test_lattice_logprob_helpers_match(rnnt_type):
    am, lm, symbols, boundary = _inputs(11, B=3, T=12, U=5, V=9, rnnt_type=rnnt_type)
    common = dict(symbols=symbols, termination_symbol=0, boundary=boundary, rnnt_type=rnnt_type)
    pairs = [
        (R.get_rnnt_logprobs(lm=lm, am=am, **common), fast_rnnt.get_rnnt_logprobs(lm=lm, am=am, **common)),
        (R.get_rnnt_logprobs_smoothed(lm=lm, am=am, lm_only_scale=0.2, am_only_scale=0.1, **common),
         fast_rnnt.get_rnnt_logprobs_smoothed(lm=lm, am=am, lm_only_scale=0.2, am_only_scale=0.1, **common)),
    ]
    full = _joiner(am[:, :, None], lm[:, None])
    pairs.append((R.get_rnnt_logprobs_joint(full, **common), fast_rnnt.get_rnnt_logprobs_joint(full, **common)))
    ranges = torch.clamp(torch.arange(12).view(1, 12, 1) // 3 + torch.arange(3), max=5).expand(3, 12, 3)
    ranges = ranges - (ranges[:, :, -1:] - 5).clamp(min=0)  # windows of 3 consecutive s within [0, 5]
    am_p, lm_p = R.do_rnnt_pruning(am, lm, ranges.contiguous())
    logits = _joiner(am_p, lm_p)
    pairs.append((R.get_rnnt_logprobs_pruned(logits, ranges=ranges.contiguous(), **common),
                  fast_rnnt.get_rnnt_logprobs_pruned(logits, ranges=ranges.contiguous(), **common)))
    for (px, py), (rx, ry) in pairs:
        torch.testing.assert_close(px, rx, **TOL)  # also checks that -inf sit in the same places
        torch.testing.assert_close(py, ry, **TOL)
