"""Exit criteria against values worked out by hand and against an independent torch computation: exact zeros,
padding, zero frames, all-blank exits, -inf N-best scores, paper 1's N-best posterior, and inputs on which every
criterion gives another value (so that swapping two of them fails)."""
import math

import numpy as np
import pytest
import torch

from splitformer.decoding import decision
from splitformer.decoding.exits import Traces, exit_score, nbest_posterior, pick_under_budget, stops, sweep_thresholds


def _log(rows):
    """(B, T, V) log-probs from posteriors given as nested lists (zeros become -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def _reference(lp: torch.Tensor, lens, blank: int, count_blank: bool):
    """Entropy and confidence per utterance by torch.distributions and plain loops (no code shared with
    decision.py), with the documented values for an utterance with nothing to score."""
    ent, conf = [], []
    V = lp.size(-1)
    for b, n in enumerate(lens):
        frames = lp[b, :n]
        best = frames.argmax(-1)
        use = [t for t in range(n) if count_blank or int(best[t]) != blank]
        if not use or bool((best == blank).all()):
            ent.append(math.log(V))
            conf.append(1.0 / V)
            continue
        d = torch.distributions.Categorical(logits=frames[use])
        ent.append(float(d.entropy().mean()))
        conf.append(float(d.probs.max(-1).values.mean()))
    return np.array(ent), np.array(conf)


@pytest.mark.parametrize("count_blank", [True, False])
def test_numpy_scores_equal_an_independent_torch_computation(count_blank):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 5, generator=g, dtype=torch.float64) * 3
    logits[1, :, 0] += 50  # every frame blank: uncertain whatever its posteriors
    lp = logits.log_softmax(-1)
    lens = [9, 9, 4, 1, 0, 7]  # one-frame and zero-frame utterances among them
    lp[2, 4:] = float("nan")  # padding never read
    want_e, want_c = _reference(lp, lens, 0, count_blank)
    got = decision.frame_scores(lp.numpy(), lens, blank_id=0, count_blank=count_blank)
    np.testing.assert_allclose(got["entropy"], want_e, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["confidence"], want_c, rtol=1e-12, atol=1e-12)
    # the torch entry point (what PyTorch decoding calls) gives the very same values
    for s, want in (("entropy", want_e), ("confidence", want_c)):
        torch_side = exit_score(s, lp.float(), torch.tensor(lens), count_blank=count_blank).numpy()
        np.testing.assert_allclose(torch_side, want, rtol=1e-5, atol=1e-6)
    assert got["entropy"][1] == pytest.approx(math.log(5)) and got["confidence"][1] == pytest.approx(0.2)
    assert got["entropy"][4] == pytest.approx(math.log(5))  # zero frames: uncertain too


def test_entropy_by_hand_with_exact_zeros_and_padding():
    # utterance 0: frames [0, 1, 0] (entropy 0) and [0.5, 0.5, 0] (ln 2); utterance 1: one valid frame
    # [0.25, 0.25, 0.5] (1.5 ln 2), then a padding frame of NaN that must not leak into the mean. Blank is 0.
    lp = _log([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]],
               [[0.25, 0.25, 0.5], [float("nan")] * 3]])
    got = decision.frame_scores(lp.numpy(), [2, 1])
    assert not np.isnan(got["entropy"]).any()
    assert got["entropy"][0] == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert got["entropy"][1] == pytest.approx(1.5 * math.log(2), abs=1e-12)
    # counting token frames only: utterance 0's second frame is a blank/token tie, argmax blank -> left out
    assert decision.frame_scores(lp.numpy(), [2, 1], count_blank=False)["entropy"][0] == pytest.approx(0.0)


def test_tokenless_exits_are_uncertain_for_utterances_and_as_scored_for_chunks():
    lp = _log([[[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]])  # confident blanks: the best path holds no token
    utt = decision.frame_scores(lp.numpy(), [1 * 2])
    assert utt["confidence"][0] == pytest.approx(1 / 3) and utt["entropy"][0] == pytest.approx(math.log(3))
    chunk = decision.frame_scores(lp.numpy(), [2], tokenless="confident")
    assert chunk["confidence"][0] == pytest.approx(0.85)
    # so a threshold that stops confident utterances does not stop this one at a low exit
    assert not decision.stops("confidence", utt["confidence"], 0.8)[0]
    assert decision.stops("confidence", chunk["confidence"], 0.8)[0]


def test_nbest_posterior_by_hand_and_its_defined_values():
    # One frame, blank 0: the label sequences are () with p=0.5, (1,) with 0.3, (2,) with 0.2. The best is
    # the empty one, so an utterance scorer calls it uncertain (1/N) and a chunk scorer reads its share.
    lp = _log([[[0.5, 0.3, 0.2]]])
    lens = torch.tensor([1])
    assert nbest_posterior(lp, lens, nbest=3, tokenless="confident").item() == pytest.approx(0.5, abs=1e-12)
    assert nbest_posterior(lp, lens, nbest=2, tokenless="confident").item() == pytest.approx(0.5 / 0.8, abs=1e-12)
    assert nbest_posterior(lp, lens, nbest=3).item() == pytest.approx(1 / 3)
    # Frames [0.6, 0.4, 0] and [0.5, 0.5, 0]: (1,) 0.4*0.5 + 0.6*0.5 + 0.4*0.5 = 0.70 against () 0.30.
    two = _log([[[0.6, 0.4, 0.0], [0.5, 0.5, 0.0]]])
    assert nbest_posterior(two, torch.tensor([2]), nbest=4).item() == pytest.approx(0.7, abs=1e-12)
    # -inf everywhere: no information, 1/N (not NaN); one finite score among -inf: certain
    assert decision.share_of_best([-math.inf] * 4, 4) == pytest.approx(0.25)
    assert decision.share_of_best([-3.0, -math.inf], 2) == 1.0
    with pytest.raises(ValueError, match="always 1"):
        nbest_posterior(lp, lens, nbest=1)


def test_every_criterion_reads_its_own_score_so_a_swap_fails():
    # Frames whose best symbols are tokens, with distinct values under each criterion.
    lp = _log([[[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]])
    lens = torch.tensor([2])
    ent = exit_score("entropy", lp, lens).item()
    conf = exit_score("confidence", lp, lens).item()
    post = exit_score("posterior", lp, lens, nbest=4).item()
    p0, p1 = np.array([0.1, 0.7, 0.2]), np.array([0.2, 0.2, 0.6])
    assert ent == pytest.approx(-(p0 * np.log(p0)).sum() / 2 - (p1 * np.log(p1)).sum() / 2, abs=1e-12)
    assert conf == pytest.approx((0.7 + 0.6) / 2, abs=1e-12)
    # label sequences: (1, 2) 0.42, (1,) 0.14 + 0.14 + 0.02, (2,) 0.12 + 0.04 + 0.06, (2, 1) 0.04, () 0.02;
    # the 4-best leaves () out, and the best's share is 0.42 / 0.98
    assert post == pytest.approx(0.42 / 0.98, abs=1e-9)
    assert len({round(ent, 6), round(conf, 6), round(post, 6)}) == 3
    # a threshold between the values tells the criteria apart: each stops or climbs as its own rule says
    assert stops("entropy", ent, ent + 0.01) and not stops("entropy", ent, ent - 0.01)
    assert stops("confidence", conf, conf - 0.01) and not stops("confidence", conf, conf + 0.01)
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


def test_a_nan_score_is_refused_rather_than_climbing_silently():
    with pytest.raises(ValueError, match="NaN"):
        decision.choose_exits("entropy", 10.0, np.array([[math.nan, 0.1]]))


def test_choose_exits_per_utterance_and_per_threshold():
    scores = np.array([[0.6, 0.4], [0.1, 0.9], [0.9, 0.9]])  # two exits scored, a third always stops
    assert decision.choose_exits("entropy", 0.5, scores).tolist() == [1, 0, 2]
    assert decision.choose_exits("confidence", 0.5, scores).tolist() == [0, 1, 0]
    assert decision.choose_exits("entropy", [0.0, 1.0, 0.95], scores).tolist() == [2, 0, 0]


def _traces():
    # three utterances, exits 2/4/6; utterance u1 is right from exit 4 on
    return Traces(
        cut_ids=["u0", "u1", "u2"], refs=[["A"], ["A", "B"], ["C"]],
        hyps=[[["A"], ["A"], ["A"]], [["X"], ["A", "B"], ["A", "B"]], [[], ["C"], ["C"]]],
        durations=np.array([1.0, 2.0, 1.0]), errors=np.array([[0, 0, 0], [2, 0, 0], [1, 0, 0]]),
        ref_words=np.array([1, 2, 1]),
        scores={"entropy": np.array([[0.1, 0.05], [1.0, 0.2], [2.0, 0.1]])},
        encoder_seconds=np.full((3, 3), 0.01), scorer_seconds=np.array([[0.001, 0.002, 0.0]] * 3),
        search_seconds=np.full((3, 3), 0.005))


def test_simulate_counts_the_encoder_the_criterion_at_every_exit_scored_and_the_search():
    tr = _traces()
    enc, scr = [10.0, 20.0, 30.0], [1.0, 2.0, 0.0]
    sim = tr.simulate("entropy", 0.5, [2, 4, 6], enc, scr)
    assert sim["exit_index"].tolist() == [0, 1, 1]
    assert sim["wer"] == pytest.approx(0.0)
    # u0 stops at exit 2 (encoder 10 + scored there 1), u1 and u2 at exit 4 (20 + 1 + 2), weighted by duration
    assert sim["macs_per_second"] == pytest.approx((11 * 1 + 23 * 2 + 23 * 1) / 4)
    assert sim["mean_exit_layer"] == pytest.approx((2 + 4 + 4) / 3)
    # time: encoder up to the exit, the scorer at each exit scored, the search at the exit
    assert sim["rtf"] == pytest.approx((0.01 + 0.001 + 0.005 + 2 * (0.02 + 0.003 + 0.005)) / 4)
    top = tr.simulate("entropy", 0.0, [2, 4, 6], enc, scr)  # never stops early: scored at 2 and 4, never at 6
    assert top["exit_index"].tolist() == [2, 2, 2] and top["macs_per_second"] == pytest.approx(33.0)
    thresholds = sweep_thresholds(tr, "entropy", points=None)
    assert thresholds[0] == 0.0 and thresholds[-1] == math.inf
    assert not set(thresholds) & set(tr.scores["entropy"].ravel().tolist())
    with pytest.raises(ValueError, match="did not score 'posterior'"):
        tr.criterion("posterior")


def test_pick_under_budget_takes_the_lowest_wer_that_fits_and_names_the_cheapest_otherwise():
    rows = [dict(threshold=0.0, wer=10.0, cost=100.0), dict(threshold=0.5, wer=12.0, cost=60.0),
            dict(threshold=0.7, wer=12.0, cost=50.0), dict(threshold=1.0, wer=30.0, cost=20.0)]
    assert pick_under_budget(rows, 100.0)["threshold"] == 0.0
    assert pick_under_budget(rows, 99.0)["threshold"] == 0.7  # WER tie: the cheaper one
    assert pick_under_budget(rows, 20.0)["threshold"] == 1.0
    with pytest.raises(ValueError, match="cheapest reachable cost is 20"):
        pick_under_budget(rows, 19.9)


def test_the_decision_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, splitformer.decoding.decision; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
