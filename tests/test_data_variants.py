"""Stage 6: narrowband and silence-trimmed variants (test sets for the robustness report, augmentation for
training), and the training-time swap that uses them."""
import random
import sys

import numpy as np
import pytest
from lhotse import load_manifest

from an4_fixture import REPO, prepared_an4

sys.path.insert(0, str(REPO / "local"))
from make_variants import speech_bounds  # noqa: E402

from splitformer.data.datamodule import SwapVariants  # noqa: E402


@pytest.fixture(scope="module")
def variants_data(an4_dir, tmp_path_factory):
    """The session's prepared AN4: an4_fixture runs ./prepare.sh --variants true, as run.sh does."""
    data = prepared_an4(tmp_path_factory.getbasetemp() / "an4_prepared", an4_dir)
    log = data.parent / "prepare.log"
    if log.is_file():  # absent when SPLITFORMER_AN4_DATA points at an existing preparation
        assert "Stage 6: narrowband and trimmed copies of [train dev test]" in log.read_text()
    return data


def test_speech_bounds_finds_the_burst():
    sr = 16000
    t = np.arange(sr) / sr
    x = np.zeros(3 * sr)
    x[sr:2 * sr] = 0.5 * np.sin(2 * np.pi * 440 * t)
    x += 1e-4 * np.random.default_rng(0).standard_normal(x.size)  # a quiet floor, 74 dB under the tone
    start, end = speech_bounds(x, sr)
    assert abs(start - 1.0) < 0.03 and abs(end - 2.0) < 0.03
    assert speech_bounds(np.zeros(sr), sr) is None
    assert speech_bounds(np.zeros(10), sr) is None  # shorter than a frame


def test_variants_keep_ids_and_texts_and_change_what_they_should(variants_data):
    fb = variants_data / "fbank"
    clean = {c.id: c for c in load_manifest(fb / "an4_cuts_test.jsonl.gz")}
    for split in ("train", "dev", "test"):  # dev's copies choose --train-variants
        assert (fb / f"an4_cuts_{split}-narrowband.jsonl.gz").is_file()
    nb = {c.id: c for c in load_manifest(fb / "an4_cuts_test-narrowband.jsonl.gz")}
    tr = {c.id: c for c in load_manifest(fb / "an4_cuts_test-trimmed.jsonl.gz")}
    assert set(nb) == set(tr) == set(clean)
    shorter = 0
    for cid, c in clean.items():
        assert nb[cid].supervisions[0].text == tr[cid].supervisions[0].text == c.supervisions[0].text
        assert abs(nb[cid].duration - c.duration) < 1e-6
        assert tr[cid].duration <= c.duration + 1e-6
        s = tr[cid].supervisions[0]
        assert s.start == 0.0 and abs(s.duration - tr[cid].duration) < 1e-6
        shorter += tr[cid].duration < c.duration - 0.1
    assert shorter > len(clean) // 2  # most AN4 recordings have silence around the speech
    # narrowband: the bins above 4 kHz (mel bins ~58-79 of 80 up to 8 kHz) lose their energy; below, little changes
    cid = sorted(clean)[0]
    f, g = clean[cid].load_features(), nb[cid].load_features()
    assert g[:, 64:].mean() < f[:, 64:].mean() - 3.0
    assert abs(g[:, :40].mean() - f[:, :40].mean()) < 0.5


def test_swap_variants_is_all_or_nothing_at_the_extremes():
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    cuts = CutSet.from_cuts(dummy_cut(i) for i in range(20))
    other = {c.id: [c.with_id(c.id)] for c in cuts}
    for c in other.values():
        c[0].custom = {"variant": True}
    random.seed(0)
    assert all((c.custom or {}).get("variant") for c in SwapVariants(other, 1.0)(cuts))
    assert not any((c.custom or {}).get("variant") for c in SwapVariants(other, 0.0)(cuts))
    half = sum(bool((c.custom or {}).get("variant")) for c in SwapVariants(other, 0.5)(cuts))
    assert 3 <= half <= 17
    assert [c.id for c in SwapVariants(other, 0.5)(cuts)] == [c.id for c in cuts]  # ids and order kept
    with pytest.raises(ValueError):
        SwapVariants(other, 1.5)
