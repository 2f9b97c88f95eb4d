"""Exit criteria against values worked out by hand on tiny posteriors (issue 12): exact zeros,
a one-frame utterance, padding, and paper 1's N-best posterior."""
import math

import pytest
import torch

from splitformer.decoding.exits import (
    UttTrace, choose_exit, exit_score, mean_entropy, mean_max_posterior, nbest_posterior, simulate, stops,
    sweep_thresholds,
)


def _log(rows):
    """(B, T, V) log-probs from posteriors given as nested lists (zeros become -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def test_entropy_by_hand_with_exact_zeros_and_padding():
    # utterance 0: frames [1, 0, 0] (entropy 0) and [0.5, 0.5, 0] (ln 2); utterance 1: one valid frame
    # [0.25, 0.25, 0.5] (1.5 ln 2), then a padding frame of NaN that must not leak into the mean.
    lp = _log([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
               [[0.25, 0.25, 0.5], [float("nan")] * 3]])
    ent = mean_entropy(lp, torch.tensor([2, 1]))
    assert not torch.isnan(ent).any()
    assert ent[0].item() == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert ent[1].item() == pytest.approx(1.5 * math.log(2), abs=1e-12)


def test_confidence_by_hand_and_empty_utterances():
    lp = _log([[[0.7, 0.2, 0.1], [0.0, 0.4, 0.6]],
               [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    conf = mean_max_posterior(lp, torch.tensor([2, 0]))
    assert conf[0].item() == pytest.approx((0.7 + 0.6) / 2, abs=1e-12)
    assert conf[1].item() == 1.0  # nothing to be unsure about
    assert mean_entropy(lp, torch.tensor([2, 0]))[1].item() == 0.0


def test_nbest_posterior_by_hand_one_frame():
    # One frame, blank 0: the label sequences are () with p=0.5, (1,) with 0.3, (2,) with 0.2.
    lp = _log([[[0.5, 0.3, 0.2]]])
    lens = torch.tensor([1])
    assert nbest_posterior(lp, lens, nbest=3).item() == pytest.approx(0.5, abs=1e-12)
    # a 2-best beam normalises over the two it keeps: 0.5 / (0.5 + 0.3)
    assert nbest_posterior(lp, lens, nbest=2).item() == pytest.approx(0.5 / 0.8, abs=1e-12)
    # a 1-best beam is always sure of itself
    assert nbest_posterior(lp, lens, nbest=1).item() == pytest.approx(1.0)


def test_nbest_posterior_by_hand_two_frames_with_a_zero():
    # Frames [0.6, 0.4, 0] and [0.5, 0.5, 0]: sequences () 0.30, (1,) 0.4*0.5 + 0.6*0.5 + 0.4*0.5 = 0.70.
    lp = _log([[[0.6, 0.4, 0.0], [0.5, 0.5, 0.0]]])
    post = nbest_posterior(lp, torch.tensor([2]), nbest=4)
    assert post.item() == pytest.approx(0.7 / 1.0, abs=1e-12)
    assert not math.isnan(post.item())


def test_exit_score_dispatches_and_rejects_unknown():
    lp = _log([[[0.5, 0.3, 0.2]]])
    lens = torch.tensor([1])
    assert exit_score("posterior", lp, lens, nbest=3).item() == pytest.approx(0.5)
    assert exit_score("confidence", lp, lens).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no score"):
        exit_score("fixed", lp, lens)


@pytest.mark.parametrize("strategy,score,threshold,expected", [
    ("entropy", 0.2, 0.3, True), ("entropy", 0.3, 0.3, False), ("entropy", 0.0, 0.0, False),
    ("confidence", 0.9, 0.8, True), ("confidence", 0.8, 0.8, False), ("confidence", 1.0, math.inf, False),
    ("posterior", 0.6, 0.5, True), ("posterior", 1.0, 1.0, False), ("posterior", 0.01, 0.0, True),
    ("fixed", 0.0, 0.0, False),
])
def test_stop_rule_is_strict(strategy, score, threshold, expected):
    assert stops(strategy, score, threshold) is expected


def test_nan_score_never_stops_so_it_must_never_be_produced():
    # The reason mean_entropy is NaN-proof: a NaN compares false and the climb runs to the top.
    assert choose_exit("entropy", 10.0, [math.nan, math.nan, 0.1]) == 2


def test_simulate_reads_the_chosen_criterion_and_counts_compute():
    tr = UttTrace("u", duration=2.0, ref=["A"], hyps=[["B"], ["A"], ["A"]],
                  entropy=[1.0, 0.5, 0.1], confidence=[0.3, 0.6, 0.9], posterior=[0.4, 0.95, 0.99])
    macs = [10.0, 20.0, 30.0]
    for strategy, t, exit_i in [("entropy", 0.6, 1), ("confidence", 0.8, 2), ("posterior", 0.9, 1), ("posterior", 0.3, 0)]:
        results, stats = simulate([tr], strategy, t, [2, 4, 6], macs)
        assert results == [("u", ["A"], tr.hyps[exit_i])]
        assert stats["mean_exit_layer"] == [2, 4, 6][exit_i]
        assert stats["macs_per_second"] == macs[exit_i]
    thresholds = sweep_thresholds([tr], "posterior")
    assert thresholds[0] == 0.0 and thresholds[-1] == math.inf
    assert all(t not in tr.posterior for t in thresholds)


def test_pick_under_budget_takes_the_lowest_wer_that_fits_and_names_the_cheapest_otherwise():
    from splitformer.decoding.exits import pick_under_budget

    rows = [dict(threshold=0.0, wer=10.0, cost=100.0), dict(threshold=0.5, wer=12.0, cost=60.0),
            dict(threshold=0.7, wer=12.0, cost=50.0), dict(threshold=1.0, wer=30.0, cost=20.0)]
    assert pick_under_budget(rows, 100.0)["threshold"] == 0.0
    assert pick_under_budget(rows, 99.0)["threshold"] == 0.7  # WER tie: the cheaper one
    assert pick_under_budget(rows, 20.0)["threshold"] == 1.0
    with pytest.raises(ValueError, match="cheapest reachable cost is 20"):
        pick_under_budget(rows, 19.9)


def test_a_trace_refuses_a_criterion_its_pass_did_not_score():
    tr = UttTrace("u", duration=1.0, ref=["A"], hyps=[["A"], ["A"]], entropy=[0.5, 0.1])
    assert tr.scores("entropy") == [0.5, 0.1]
    with pytest.raises(ValueError, match="did not score 'posterior'"):
        tr.scores("posterior")
