"""Search algorithms on small fake transducer/CTC heads (no trained model needed)."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from splitformer.decoding.search import (
    ctc_greedy_search,
    ctc_prefix_beam_search,
    greedy_search,
    modified_beam_search,
)

torch.set_num_threads(1)  # the test machines are small and shared


class FakeDecoder(nn.Module):
    def __init__(self, vocab: int, dim: int, context_size: int):
        super().__init__()
        self.context_size = context_size
        self.embedding = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim * context_size, dim)

    def forward(self, y: torch.Tensor, need_pad: bool = True) -> torch.Tensor:
        assert not need_pad and y.size(1) == self.context_size
        emb = self.embedding(y.clamp(min=0)) * (y >= 0).unsqueeze(-1)
        return torch.tanh(self.mix(emb.flatten(1))).unsqueeze(1)


class FakeTransducer(nn.Module):
    """Just the parts the transducer searches use; ``scale`` sharpens the output."""

    def __init__(self, vocab: int = 6, dim: int = 8, context_size: int = 2, scale: float = 1.0):
        super().__init__()
        self.blank_id = 0
        self.vocab_size = vocab
        self.decoder = FakeDecoder(vocab, dim, context_size)
        self.dec_proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.scale = scale

    def project_decoder(self, d: torch.Tensor) -> torch.Tensor:
        return self.dec_proj(d)

    def joiner(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.scale * self.out(torch.tanh(e + d))


@torch.no_grad()
def _path_log_prob(model: FakeTransducer, enc: torch.Tensor, path) -> float:
    """Log-prob of one alignment (one symbol or blank per frame)."""
    cs = model.decoder.context_size
    ctx = [-1] * (cs - 1) + [0]
    total = 0.0
    for t, k in enumerate(path):
        d = model.project_decoder(model.decoder(torch.tensor([ctx[-cs:]]), need_pad=False))[:, 0]
        total += float(model.joiner(enc[t:t + 1], d).log_softmax(-1)[0, k])
        if k != 0:
            ctx.append(k)
    return total


def test_greedy_and_beam_agree_on_a_peaked_model():
    torch.manual_seed(0)
    model = FakeTransducer(vocab=8, scale=30.0)
    enc = torch.randn(3, 12, 8)
    lens = torch.tensor([12, 9, 5])
    g = greedy_search(model, enc, lens)
    b = modified_beam_search(model, enc, lens, beam=4)
    assert [h.tokens for h in g] == [h.tokens for h in b]
    assert any(h.tokens for h in g)  # the check is vacuous if nothing is emitted
    for hg, hb in zip(g, b):
        assert hb.log_prob == pytest.approx(hg.log_prob, abs=1e-3)


def test_greedy_batch_matches_one_by_one_and_its_score_is_the_path_score():
    torch.manual_seed(1)
    model = FakeTransducer(vocab=6, scale=3.0)
    enc = torch.randn(3, 10, 8)
    lens = torch.tensor([10, 7, 4])
    batch = greedy_search(model, enc, lens)
    for b in range(3):
        single = greedy_search(model, enc[b:b + 1, : lens[b]], lens[b:b + 1])[0]
        assert single.tokens == batch[b].tokens
        assert single.log_prob == pytest.approx(batch[b].log_prob, abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_beam_search_never_scores_below_greedy(seed):
    torch.manual_seed(seed)
    model = FakeTransducer(vocab=6, scale=2.0)
    enc = torch.randn(2, 15, 8)
    lens = torch.tensor([15, 11])
    g = greedy_search(model, enc, lens)
    b = modified_beam_search(model, enc, lens, beam=4)
    for hg, hb in zip(g, b):
        assert hb.log_prob >= hg.log_prob - 1e-6


def test_modified_beam_search_with_a_wide_beam_is_exact():
    """With a beam wider than the lattice, the best hypothesis is the label sequence with the
    largest probability summed over all its one-symbol-per-frame alignments."""
    torch.manual_seed(3)
    V, T = 3, 4
    model = FakeTransducer(vocab=V, scale=2.0)
    enc = torch.randn(1, T, 8)
    by_labels = {}
    for path in itertools.product(range(V), repeat=T):
        labels = tuple(k for k in path if k != 0)
        lp = _path_log_prob(model, enc[0], path)
        by_labels[labels] = torch.logaddexp(torch.tensor(by_labels.get(labels, -math.inf)), torch.tensor(lp)).item()
    best_labels, best_lp = max(by_labels.items(), key=lambda kv: kv[1])
    hyp = modified_beam_search(model, enc, torch.tensor([T]), beam=V ** T)[0]
    assert tuple(hyp.tokens) == best_labels
    assert hyp.log_prob == pytest.approx(best_lp, abs=1e-4)


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    V = 4
    path = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    lp = F.one_hot(torch.tensor(path), V).float().mul(10).log_softmax(-1).unsqueeze(0)
    hyp = ctc_greedy_search(lp, torch.tensor([len(path)]))[0]
    assert hyp.tokens == [1, 1, 2, 3]
    assert hyp.log_prob == pytest.approx(float(lp[0].max(-1).values.sum()), abs=1e-5)


def test_ctc_prefix_beam_search_scores_are_exact_label_probabilities():
    """Without pruning the prefix score is the CTC probability of the label sequence, and the best
    prefix is the most probable label sequence (checked by brute force)."""
    torch.manual_seed(4)
    V, T = 3, 5
    lp = (torch.randn(1, T, V) * 2).log_softmax(-1)
    by_labels = {}
    for path in itertools.product(range(V), repeat=T):
        labels = tuple(k for i, k in enumerate(path) if k != 0 and (i == 0 or path[i - 1] != k))
        s = float(sum(lp[0, t, k] for t, k in enumerate(path)))
        by_labels[labels] = float(torch.logaddexp(torch.tensor(by_labels.get(labels, -math.inf)), torch.tensor(s)))
    best_labels, best_lp = max(by_labels.items(), key=lambda kv: kv[1])
    hyp = ctc_prefix_beam_search(lp, torch.tensor([T]), beam=100)[0]
    assert tuple(hyp.tokens) == best_labels
    assert hyp.log_prob == pytest.approx(best_lp, abs=1e-5)
    # ... and agrees with torch's CTC loss for that sequence.
    nll = F.ctc_loss(lp[0], torch.tensor(best_labels), torch.tensor([T]), torch.tensor([len(best_labels)]), reduction="sum")
    assert hyp.log_prob == pytest.approx(-float(nll), abs=1e-4)


def test_ctc_prefix_beam_not_worse_than_greedy_labels():
    torch.manual_seed(5)
    lp = (torch.randn(2, 30, 7) * 1.5).log_softmax(-1)
    lens = torch.tensor([30, 20])
    g = ctc_greedy_search(lp, lens)
    b = ctc_prefix_beam_search(lp, lens, beam=4)
    for b_i, (hg, hb) in enumerate(zip(g, b)):
        n = int(lens[b_i])
        def label_lp(tokens):
            if not tokens:
                return float(lp[b_i, :n, 0].sum())
            return -float(F.ctc_loss(lp[b_i, :n], torch.tensor(tokens), torch.tensor([n]), torch.tensor([len(tokens)]), reduction="sum"))
        # The beam's hypothesis is at least as likely (as a label sequence) as greedy's.
        assert label_lp(hb.tokens) >= label_lp(hg.tokens) - 1e-6
