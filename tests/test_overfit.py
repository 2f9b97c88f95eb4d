"""A tiny model memorises 8 real AN4 utterances: the whole stack (features, BPE, model, losses,
ScaledAdam, CTC decoding) can learn. Issue checks: Zipformer baseline, and the Splitformer at every exit."""
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from lhotse import CutSet
from lhotse.dataset import K2SpeechRecognitionDataset

from splitformer.data.datamodule import input_lens, input_strategy
from splitformer.data.tokenizer import Tokenizer
from splitformer.decoding.search import ctc_greedy_search
from splitformer.model.config import build_model, default_model_args
from splitformer.optim import ScaledAdam

TINY = {
    "zipformer-cpu": dict(encoder_dim="64,64,64", encoder_unmasked_dim="32,32,32", feedforward_dim="128,128,128",
                          num_encoder_layers="1,1,1", downsampling_factor="1,2,1", num_heads="4,4,4",
                          cnn_module_kernel="15,15,15"),
    "splitformer-cpu": dict(encoder_dim="64", encoder_unmasked_dim="64", feedforward_dim="128", num_encoder_layers="4",
                            exit_layers="2,4", split_blocks="0,1"),
}
MAX_STEPS = 300


def eight_short_cuts(an4_data: Path) -> CutSet:
    return CutSet.from_file(an4_data / "fbank" / "an4_cuts_train.jsonl.gz").filter(lambda c: c.duration < 2.5).subset(first=8)


def overfit(model, cuts: CutSet, tok: Tokenizer, lr: float = 0.04) -> Tuple[List[float], Dict[int, List[str]], List[str]]:
    """Train ``model`` on one batch of ``cuts`` (in the input it reads) until every exit transcribes at least 7 of
    them with CTC greedy search, or MAX_STEPS; return the losses, each exit's final transcripts and the
    references (in the batch's order)."""
    batch = K2SpeechRecognitionDataset(input_strategy=input_strategy(model.input_kind), return_cuts=True)[cuts]
    x, lens, texts = batch["inputs"], input_lens(batch["supervisions"]), batch["supervisions"]["text"]
    targets = tok.encode(texts)
    opt = ScaledAdam([p for p in model.parameters() if p.requires_grad], lr=lr)
    frames = float(model.encode_exits(x, lens)[-1][2].sum())

    def recovered() -> Dict[int, List[str]]:
        model.eval()
        with torch.no_grad():
            out = {}
            for exit_layer, enc, enc_lens in model.encode_exits(x, lens):
                hyps = ctc_greedy_search(model.ctc_log_probs(enc, exit_layer), enc_lens)
                out[exit_layer] = [tok.decode(h.tokens) for h in hyps]
        model.train()
        return out

    def all_exits_know(words: Dict[int, List[str]]) -> bool:
        return all(sum(w == t for w, t in zip(ws, texts)) >= 7 for ws in words.values())

    losses = []
    model.train()
    for step in range(1, MAX_STEPS + 1):
        res = model(x, lens, targets)
        loss = sum(0.5 * r["simple"] + r["pruned"] + r["ctc"] for r in res.values()) / frames
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        # Stop as soon as every exit transcribes (nearly) all eight: thread-count noise changes the exact step.
        if step % 20 == 0 and losses[-1] < 0.1 * losses[0] and all_exits_know(recovered()):
            break
    model.eval()
    return losses, recovered(), list(texts)


def assert_overfit(losses: List[float], words: Dict[int, List[str]], texts: List[str]) -> None:
    assert losses[-1] < 0.1 * losses[0], f"loss only fell from {losses[0]:.3f} to {losses[-1]:.3f}"
    for exit_layer, ws in words.items():
        correct = sum(w == t for w, t in zip(ws, texts))
        assert correct >= 7, f"exit {exit_layer} after {len(losses)} steps: {correct}/8 recovered: {list(zip(ws, texts))}"


@pytest.mark.parametrize("preset", sorted(TINY))
def test_tiny_model_overfits_eight_utterances(preset, an4_data):
    torch.manual_seed(0)
    tok = Tokenizer(an4_data / "lang_bpe_30" / "bpe.model")
    cuts = eight_short_cuts(an4_data)
    model = build_model(default_model_args(preset=preset, dropout=0.0, decoder_dim=64, joiner_dim=64, **TINY[preset]),
                        tok.vocab_size)
    assert_overfit(*overfit(model, cuts, tok))
