"""A briefly trained tiny early-exit model on AN4, shared by the decode/pretrained tests.

Builds, once per session under pytest's temp dir: AN4 dev cuts (the first 100 training
utterances) with lhotse 80-dim fbank, a 30-piece BPE, and two epochs of checkpoints of a tiny
CTC-trained early-exit model (exits after layers 2, 4, 6), in the layout train.py writes.
"""
import argparse
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from an4_fixture import an4_utterances

torch.set_num_threads(1)  # the test machines are small and shared

TINY = dict(
    preset=None, encoder="early-exit", encoder_embed="conv1d", layer_type="conformer", pos_encoding="abs",
    input_downsample=1, num_encoder_layers="6", exit_layers="2,4,6", encoder_dim="32", encoder_unmasked_dim="32",
    feedforward_dim="64", num_heads="2", cnn_module_kernel="7", split_blocks="0,2", split_downsample="drop",
    split_combine="sum", decoder_dim=32, joiner_dim=32, dropout=0.0,
)
NUM_DEV = 100


def _prepare_data(an4_dir: Path, root: Path) -> None:
    from lhotse.audio import backend as B

    previous = B.get_current_audio_backend()
    B.set_current_audio_backend(B.LibsndfileBackend())  # soundfile reads AN4's plain SPHERE; no sph2pipe
    try:
        _prepare_data_with_soundfile(an4_dir, root)
    finally:
        B.set_current_audio_backend(previous)


def _prepare_data_with_soundfile(an4_dir: Path, root: Path) -> None:
    from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    import sentencepiece as spm

    utts = an4_utterances(an4_dir, NUM_DEV)
    recs = RecordingSet.from_recordings(Recording.from_file(u.path, recording_id=u.id) for u in utts)
    sups = SupervisionSet.from_segments(
        SupervisionSegment(id=u.id, recording_id=u.id, start=0.0, duration=recs[u.id].duration, text=u.text,
                           language="English")
        for u in utts)
    cuts = CutSet.from_manifests(recordings=recs, supervisions=sups)
    (root / "fbank").mkdir(parents=True, exist_ok=True)
    cuts = cuts.compute_and_store_features(
        extractor=Fbank(FbankConfig(num_mel_bins=80)), storage_path=root / "fbank" / "feats",
        storage_type=LilcomChunkyWriter, num_jobs=1)
    cuts.to_file(root / "fbank" / "an4_cuts_dev.jsonl.gz")

    all_text = [u.text for u in an4_utterances(an4_dir)]
    (root / "lang").mkdir(exist_ok=True)
    (root / "lang" / "text").write_text("\n".join(all_text) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(root / "lang" / "text"), model_prefix=str(root / "lang" / "bpe"), vocab_size=30,
        model_type="unigram", character_coverage=1.0, user_defined_symbols=["<blk>", "<sos/eos>"],
        unk_id=2, bos_id=-1, eos_id=-1, minloglevel=2)


def tiny_args(vocab_size: int, **overrides) -> argparse.Namespace:
    from splitformer.model.config import default_model_args

    args = default_model_args(**{k: v for k, v in TINY.items() if k != "preset"})
    for k, v in overrides.items():
        setattr(args, k, v)
    args.vocab_size = vocab_size
    return args


def _train(root: Path, steps_per_epoch: int = 30) -> None:
    """Two short epochs of CTC training on every exit (enough to make outputs non-trivial)."""
    from lhotse import CutSet
    import sentencepiece as spm
    from splitformer.model.config import build_model, model_args_dict

    torch.manual_seed(0)
    sp = spm.SentencePieceProcessor(model_file=str(root / "lang" / "bpe.model"))
    args = tiny_args(sp.get_piece_size())
    model = build_model(args, args.vocab_size)
    model.train()
    cuts = CutSet.from_file(root / "fbank" / "an4_cuts_dev.jsonl.gz").to_eager()
    feats = [torch.from_numpy(c.load_features()) for c in cuts]
    targets = [sp.encode(c.supervisions[0].text) for c in cuts]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    avg = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    step = 0
    losses: List[float] = []  # per step, summed over exits: saved so that a test can see learning happen
    for epoch in (1, 2):
        for _ in range(steps_per_epoch):
            idx = torch.randint(len(cuts), (16,)).tolist()
            x = torch.nn.utils.rnn.pad_sequence([feats[i] for i in idx], batch_first=True)
            x_lens = torch.tensor([feats[i].size(0) for i in idx])
            loss = 0.0
            for exit_layer, enc, enc_lens in model.encode_exits(x, x_lens):
                lp = model.ctc_log_probs(enc, exit_layer)
                ys = [targets[i] for i in idx]
                loss = loss + F.ctc_loss(lp.transpose(0, 1), torch.tensor(sum(ys, [])), enc_lens,
                                         torch.tensor([len(y) for y in ys]), reduction="sum", zero_infinity=True) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            for k, v in model.state_dict().items():  # running average since the start, icefall-style
                if v.is_floating_point():
                    avg[k] += (v.double() - avg[k]) / (step + 1)
        torch.save(dict(model=model.state_dict(), model_avg={k: v.float() if v.is_floating_point() else model.state_dict()[k]
                                                              for k, v in avg.items()},
                        args=model_args_dict(args), epoch=epoch, batch_idx_train=step, fixture_losses=list(losses)),
                   root / "exp" / f"epoch-{epoch}.pt")


def build_trained_an4(an4_dir: Path, base: Path) -> Dict[str, Path]:
    root = base / "decode-an4-tiny"
    done = root / "DONE"
    if not done.is_file():
        (root / "exp").mkdir(parents=True, exist_ok=True)
        _prepare_data(an4_dir, root)
        _train(root)
        done.write_text("ok\n")
    return dict(root=root, exp=root / "exp", manifests=root / "fbank", bpe=root / "lang" / "bpe.model")


def pytest_configure_shared(tmp_path_factory, an4_dir):  # helper for the other test modules
    return build_trained_an4(an4_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def trained_an4(tmp_path_factory, an4_dir):
    return build_trained_an4(an4_dir, tmp_path_factory.getbasetemp())


def test_fixture_trains_a_model_whose_loss_is_finite_and_falls(trained_an4):
    import math

    ckpt = torch.load(trained_an4["exp"] / "epoch-2.pt", weights_only=True)
    losses = ckpt["fixture_losses"]
    assert ckpt["batch_idx_train"] == len(losses) == 60
    assert all(math.isfinite(x) for x in losses)
    # the decode tests need a model that learned something: the last 10 steps' mean CTC loss (summed over
    # 3 exits) is well under the first 5 steps'
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert set(ckpt["model"]) == set(ckpt["model_avg"])
