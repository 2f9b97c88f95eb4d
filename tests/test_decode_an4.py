"""decode.py end to end on AN4 dev with a briefly trained tiny early-exit model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitformer.decode import main as decode_main
from splitformer.decoding.loading import DecodeSetupError, averaged_state, build_and_load, checkpoint_args
from recogs import wer_from_recogs
from test_decoding_fixture import trained_an4  # noqa: F401  (fixture)

torch.set_num_threads(1)  # the test machines are small and shared

REPO = Path(__file__).resolve().parents[1]


def _decode(t, *extra, method="greedy_search"):
    argv = ["--exp-dir", str(t["exp"]), "--epoch", "2", "--avg", "1", "--decoding-method", method,
            "--manifest-dir", str(t["manifests"]), "--bpe-model", str(t["bpe"]), "--test-sets", "dev",
            "--max-duration", "100", "--num-threads", "1", *extra]
    return decode_main(argv)


def _num_dev(t) -> int:
    from lhotse import CutSet

    return len(CutSet.from_file(t["manifests"] / "an4_cuts_dev.jsonl.gz"))


def _runs(t, method="greedy_search"):
    return json.loads((t["exp"] / method / "results-dev.json").read_text())["runs"]


def _independent_exits(t, strategy: str, threshold: float) -> dict:
    """Per-utterance exit choices for ``strategy`` computed apart from splitformer.decoding.exits and decision:
    each utterance alone, torch.distributions for the entropy, a plain loop for the rule, and the documented
    value of an exit whose best path holds no token (a uniform posterior's: log V, 1/V)."""
    import argparse

    from splitformer.decode import load_model, test_loader

    args = argparse.Namespace(exp_dir=t["exp"], epoch=2, iter=0, avg=1, use_averaged_model=False)
    model, _ = load_model(args)
    loader, _ = test_loader(t["manifests"], "an4", "dev", 30)
    counts = {e: 0 for e in model.exits}
    with torch.no_grad():
        for batch in loader:
            feats, lens = batch["inputs"], batch["supervisions"]["num_frames"]
            for i in range(feats.size(0)):
                n = int(lens[i])
                chosen = model.exits[-1]
                for e in model.exits[:-1]:
                    enc, enc_lens = model.encode(feats[i:i + 1, :n], lens[i:i + 1], exit_layer=e)
                    logits = model.ctc_log_probs(enc, e)[0, : int(enc_lens[0])]
                    dist = torch.distributions.Categorical(logits=logits.double())
                    score = dist.entropy().mean() if strategy == "entropy" else dist.probs.max(-1).values.mean()
                    if bool((logits.argmax(-1) == model.blank_id).all()):  # nothing heard: uncertain
                        v = logits.size(-1)
                        score = torch.tensor(v).double().log() if strategy == "entropy" else 1.0 / v
                    if (score < threshold) if strategy == "entropy" else (score > threshold):
                        chosen = e
                        break
                counts[chosen] += 1
    return {str(e): c for e, c in counts.items()}


def test_sweep_of_all_exits_equals_each_exit_alone(trained_an4):
    t = trained_an4
    assert _decode(t, "--exit-layer", "all") == 0
    out = t["exp"] / "greedy_search"
    sweep = {r["exit_layer"]: r for r in _runs(t).values() if r.get("from_sweep")}
    assert sorted(sweep) == [2, 4, 6]
    sweep_recogs = {e: (out / f"recogs-dev-epoch-2_avg-1_exit-{e}_greedy_search.txt").read_text() for e in (2, 6)}
    assert any("hyp=[]" not in line for line in sweep_recogs[2].splitlines() if "hyp=" in line)  # not vacuous
    for e in (2, 6):
        assert _decode(t, "--exit-layer", str(e)) == 0
        alone = [r for r in _runs(t).values() if r["exit_layer"] == e and not r.get("from_sweep")]
        assert alone and alone[0]["wer"] == sweep[e]["wer"]
        recogs = out / f"recogs-dev-epoch-2_avg-1_exit-{e}_greedy_search.txt"
        assert recogs.read_text() == sweep_recogs[e]
        assert wer_from_recogs(recogs) == pytest.approx(alone[0]["wer"], abs=1e-9)
    for r in sweep.values():
        assert r["num_utts"] == _num_dev(t) and r["rtf_encoder"] > 0
    assert sweep[2]["macs_per_second"] < sweep[4]["macs_per_second"] < sweep[6]["macs_per_second"]
    errs = (out / "errs-dev-epoch-2_avg-1_exit-2_greedy_search.txt").read_text()
    for section in ("%WER", "PER-UTT DETAILS:", "SUBSTITUTIONS:", "DELETIONS:", "INSERTIONS:", "PER-WORD STATS:"):
        assert section in errs


def test_an_exit_that_does_not_exist_lists_the_valid_ones(trained_an4, capsys):
    assert _decode(trained_an4, "--exit-layer", "3") == 2
    assert "valid exits: 2, 4, 6" in capsys.readouterr().err


@pytest.mark.parametrize("strategy,threshold,expected", [
    ("entropy", "0", 6), ("confidence", "0", 2), ("posterior", "inf", 6),
])
def test_dynamic_exit_thresholds_at_the_extremes_reduce_to_a_fixed_exit(trained_an4, strategy, threshold, expected):
    t = trained_an4
    assert _decode(t, "--exit-strategy", strategy, "--exit-threshold", threshold, "--max-duration", "30") == 0
    nbest = "-nbest-4" if strategy == "posterior" else ""
    run = _runs(t)[f"epoch-2_avg-1_exit-{strategy}-{threshold}{nbest}_greedy_search"]
    assert run["exit_counts"] == {str(e): (100 if e == expected else 0) for e in (2, 4, 6)}
    assert _decode(t, "--exit-layer", str(expected)) == 0  # the fixed exit it reduces to, decoded here
    fixed = _runs(t)[f"epoch-2_avg-1_exit-{expected}_greedy_search"]
    out = t["exp"] / "greedy_search"
    assert (out / f"recogs-dev-epoch-2_avg-1_exit-{strategy}-{threshold}{nbest}_greedy_search.txt").read_text() == \
        (out / f"recogs-dev-epoch-2_avg-1_exit-{expected}_greedy_search.txt").read_text()
    assert run["wer"] == fixed["wer"]


@pytest.mark.parametrize("strategy", ["entropy", "confidence"])
def test_dynamic_exits_at_a_middle_threshold_match_an_independent_computation(trained_an4, strategy):
    """The threshold that splits the utterances: the exits decode.py chose, against the rule applied
    by hand (torch.distributions, one utterance at a time, no code shared with the decoder)."""
    t = trained_an4
    assert _decode(t, "--exit-threshold", "sweep", method="ctc_greedy_search") == 0
    curve = _runs(t, "ctc_greedy_search")["epoch-2_avg-1_exit-sweep-nbest-4_ctc_greedy_search"]["curves"][strategy]
    point = min(curve, key=lambda r: abs(r["mean_exit_layer"] - 4))
    assert 2 < point["mean_exit_layer"] < 6, curve  # the model must be unsure enough for a split
    thr = repr(point["threshold"])
    assert _decode(t, "--exit-strategy", strategy, "--exit-threshold", thr, "--max-duration", "30") == 0
    run = _runs(t)[f"epoch-2_avg-1_exit-{strategy}-{thr}_greedy_search"]
    assert run["exit_counts"] == _independent_exits(t, strategy, point["threshold"])
    assert sum(1 for c in run["exit_counts"].values() if c) >= 2
    # batches of similar length (--sort-by-duration): other batches, the same exits and words
    recogs = t["exp"] / "greedy_search" / f"recogs-dev-epoch-2_avg-1_exit-{strategy}-{thr}_greedy_search.txt"
    words = recogs.read_text()
    assert _decode(t, "--exit-strategy", strategy, "--exit-threshold", thr, "--max-duration", "30",
                   "--sort-by-duration", "true") == 0
    assert _runs(t)[f"epoch-2_avg-1_exit-{strategy}-{thr}_greedy_search"]["exit_counts"] == run["exit_counts"]
    assert recogs.read_text() == words


def test_threshold_sweep_curve_spans_first_to_last_exit_and_matches_a_real_dynamic_run(trained_an4):
    t = trained_an4
    assert _decode(t, "--exit-threshold", "sweep", method="ctc_greedy_search") == 0
    runs = _runs(t, "ctc_greedy_search")
    sweep = runs["epoch-2_avg-1_exit-sweep-nbest-4_ctc_greedy_search"]
    curves = sweep["curves"]
    fixed = {r["exit_layer"]: r for r in runs.values() if r["kind"] == "fixed" and r.get("from_sweep")}
    for strategy in ("entropy", "confidence", "posterior"):
        rows = curves[strategy]
        scorer = {int(e): m for e, m in sweep["scorer_macs"][strategy].items()}
        assert scorer[2] > 0 and scorer[4] > 0 and scorer[6] == 0  # the last exit is never scored
        # more than the two extremes: some threshold sends the utterances to different exits
        assert any(2 < r["mean_exit_layer"] < 6 for r in rows), (strategy, rows)
        for r in rows:  # the encoder's compute lies between the first and the last exit's; the total adds the scorer
            assert fixed[2]["macs_per_second"] * (1 - 1e-9) <= r["encoder_macs_per_second"] <= fixed[6]["macs_per_second"] * (1 + 1e-9)
            if r["mean_exit_layer"] == 2:
                assert r["wer"] == fixed[2]["wer"]
                assert r["macs_per_second"] == pytest.approx(fixed[2]["macs_per_second"] + scorer[2], rel=1e-9)
            if r["mean_exit_layer"] == 6:  # every utterance scored at exits 2 and 4 on its way up
                assert r["wer"] == fixed[6]["wer"]
                assert r["macs_per_second"] == pytest.approx(fixed[6]["macs_per_second"] + scorer[2] + scorer[4], rel=1e-9)
    tsv = (t["exp"] / "ctc_greedy_search" / "dynamic-sweep-dev-epoch-2_avg-1_exit-sweep-nbest-4_ctc_greedy_search.tsv")
    assert tsv.read_text().startswith("strategy\tthreshold\tWER")
    # A threshold in the middle of the curve: the simulated point equals a real per-utterance run.
    mid = [r for r in curves["entropy"] if 2 < r["mean_exit_layer"] < 6 and r["threshold"] is not None]
    assert mid
    point = mid[len(mid) // 2]
    thr = repr(point["threshold"])
    assert _decode(t, "--exit-strategy", "entropy", "--exit-threshold", thr, method="ctc_greedy_search") == 0
    real = _runs(t, "ctc_greedy_search")[f"epoch-2_avg-1_exit-entropy-{thr}_ctc_greedy_search"]
    assert real["mean_exit_layer"] == pytest.approx(point["mean_exit_layer"], abs=1e-9)
    assert real["wer"] == pytest.approx(point["wer"], abs=1e-9)
    assert real["macs_per_second"] == pytest.approx(point["macs_per_second"], rel=1e-6)


def test_averaging_modes(trained_an4):
    exp = trained_an4["exp"]
    e1 = torch.load(exp / "epoch-1.pt", weights_only=True)
    e2 = torch.load(exp / "epoch-2.pt", weights_only=True)
    k = next(k for k, v in e2["model"].items() if v.is_floating_point() and v.numel() > 1)
    plain = averaged_state(exp, 2, 2, use_averaged_model=False)
    torch.testing.assert_close(plain[k], (e1["model"][k] + e2["model"][k]) / 2)
    # icefall's method: the running average over the batches of epoch 2 only.
    n1, n2 = e1["batch_idx_train"], e2["batch_idx_train"]
    ema = averaged_state(exp, 2, 1, use_averaged_model=True)
    expect = (e2["model_avg"][k].double() * n2 - e1["model_avg"][k].double() * n1) / (n2 - n1)
    torch.testing.assert_close(ema[k], expect.float())
    # epoch E-A = 0 does not exist: epoch E's own model_avg.
    torch.testing.assert_close(averaged_state(exp, 2, 2, use_averaged_model=True)[k], e2["model_avg"][k])
    assert _decode(trained_an4, "--exit-layer", "4", "--use-averaged-model", "--avg", "1") == 0
    with pytest.raises(DecodeSetupError, match="too large"):
        averaged_state(exp, 2, 3, use_averaged_model=False)


def test_a_checkpoint_of_another_architecture_is_refused_clearly(trained_an4, tmp_path):
    ckpt = torch.load(trained_an4["exp"] / "epoch-2.pt", weights_only=True)
    args = checkpoint_args(ckpt, Path("epoch-2.pt"))
    args.encoder_dim = args.encoder_unmasked_dim = "48"
    with pytest.raises(DecodeSetupError, match="does not match the model architecture"):
        build_and_load(args, ckpt["model"], args.vocab_size, "epoch-2.pt")
    bad = tmp_path / "epoch-2.pt"
    torch.save({"model": ckpt["model"]}, bad)  # no flags stored
    with pytest.raises(DecodeSetupError, match="holds no model flags"):
        checkpoint_args(torch.load(bad, weights_only=True), bad)


def test_missing_checkpoint_and_executable_script(trained_an4, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([str(REPO / "splitformer" / "decode.py"), "--exp-dir", str(tmp_path), "--epoch", "3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "epoch-3.pt: no such file" in r.stderr


def test_beam_searches_on_the_trained_model(trained_an4):
    """Beam search never scores below greedy on its own objective; both beam methods run end to end."""
    import argparse

    from splitformer.decode import load_model, test_loader
    from splitformer.decoding.search import greedy_search, modified_beam_search

    t = trained_an4
    args = argparse.Namespace(exp_dir=t["exp"], epoch=2, iter=0, avg=1, use_averaged_model=False)
    model, _ = load_model(args)
    loader, _ = test_loader(t["manifests"], "an4", "dev", 15)
    batch = next(iter(loader))
    feats, lens = batch["inputs"], batch["supervisions"]["num_frames"]
    with torch.no_grad():
        for exit_layer, enc, enc_lens in model.encode_exits(feats, lens):
            proj = model.project_encoder(enc, exit_layer)
            g = greedy_search(model, proj, enc_lens)
            b = modified_beam_search(model, proj, enc_lens, beam=4)
            assert all(hb.log_prob >= hg.log_prob - 1e-4 for hg, hb in zip(g, b))
    for method in ("modified_beam_search", "ctc_prefix_beam_search"):
        assert _decode(t, "--exit-layer", "4", "--max-duration", "15", method=method) == 0
        tag = f"epoch-2_avg-1_exit-4_{method}_beam-4"
        assert (t["exp"] / method / f"errs-dev-{tag}.txt").is_file()
        assert _runs(t, method)[tag]["num_utts"] == _num_dev(t)


def test_conflicting_exit_flags_are_refused(trained_an4, capsys):
    assert _decode(trained_an4, "--exit-layer", "2", "--exit-strategy", "entropy", "--exit-threshold", "1") == 2
    assert "drop --exit-layer" in capsys.readouterr().err
    assert _decode(trained_an4, "--exit-threshold", "0.5") == 2
    assert "needs --exit-strategy" in capsys.readouterr().err
    assert _decode(trained_an4, "--exit-strategy", "confidence") == 2
    assert "needs --exit-threshold" in capsys.readouterr().err


def test_compute_budget_picks_a_threshold_that_meets_it_and_reports_the_cost_reached(trained_an4, tmp_path, capsys,
                                                                                     monkeypatch):
    t = trained_an4
    assert _decode(t, "--exit-threshold", "sweep", "--max-duration", "30") == 0
    sweep = _runs(t)["epoch-2_avg-1_exit-sweep-nbest-4_greedy_search"]["curves"]["entropy"]
    lo, hi = min(r["macs_per_second"] for r in sweep), max(r["macs_per_second"] for r in sweep)
    budget = (lo + hi) / 2  # some thresholds fit, others do not
    # the budget set must not be a set being scored
    assert _decode(t, "--exit-strategy", "entropy", "--exit-budget-macs", repr(budget)) == 2
    assert "--budget-set dev is also a set to decode" in capsys.readouterr().err
    # a budget set and a test set of their own: the fixture's dev cuts split in two
    from lhotse import CutSet

    cuts = CutSet.from_file(t["manifests"] / "an4_cuts_dev.jsonl.gz").to_eager()
    cuts.subset(first=50).to_file(t["manifests"] / "an4_cuts_deva.jsonl.gz")
    cuts.subset(last=50).to_file(t["manifests"] / "an4_cuts_devb.jsonl.gz")
    test_set = ["--test-sets", "devb", "--budget-set", "deva", "--max-duration", "30"]
    assert _decode(t, "--exit-strategy", "entropy", "--exit-budget-macs", repr(budget), *test_set) == 0
    runs = json.loads((t["exp"] / "greedy_search" / "results-devb.json").read_text())["runs"]
    run = next(r for r in runs.values() if r["kind"] == "budget" and r["budget_kind"] == "macs")
    assert run["budget"] == budget and run["budget_set"] == "deva" and run["test_set"] == "devb"
    # on the budget set the choice meets the budget, trying every distinct threshold (more than a sweep's 24)
    assert run["dev_cost"] <= budget and run["thresholds_tried"] > 26
    assert run["achieved_cost"] > 0 and run["costs"].startswith("encoder up to the exit + criterion")
    # an impossible budget names the cheapest reachable cost
    assert _decode(t, "--exit-strategy", "confidence", "--exit-budget-macs", "1", *test_set) == 2
    assert "cheapest reachable cost" in capsys.readouterr().err
    # a real-time-factor budget that excludes the slower thresholds: the one chosen meets it when the budget set is
    # decoded with it (measured, not simulated). On the tiny model the blocks cost less than the timing noise (a CI
    # run once measured the first exit slower than the last), so each block is given a fixed 20 ms of wall time:
    # machine load only adds to it, and the exits' costs stay apart.
    import time

    from splitformer.model.early_exit import EarlyExitEncoder

    run_block = EarlyExitEncoder.run_block

    def costly_block(self, *args, **kwargs):
        time.sleep(0.02)
        return run_block(self, *args, **kwargs)

    monkeypatch.setattr(EarlyExitEncoder, "run_block", costly_block)
    ctc = dict(method="ctc_greedy_search")
    assert _decode(t, "--exit-strategy", "entropy", "--exit-threshold", "0", "--max-duration", "30", **ctc) == 0
    assert _decode(t, "--exit-strategy", "entropy", "--exit-threshold", "inf", "--max-duration", "30", **ctc) == 0
    dev = _runs(t, "ctc_greedy_search")
    slow = dev["epoch-2_avg-1_exit-entropy-0_ctc_greedy_search"]
    fast = dev["epoch-2_avg-1_exit-entropy-inf_ctc_greedy_search"]
    assert fast["mean_exit_layer"] < slow["mean_exit_layer"] and fast["rtf_decode"] < 0.8 * slow["rtf_decode"]
    rtf_budget = (fast["rtf_decode"] + slow["rtf_decode"]) / 2
    assert _decode(t, "--exit-strategy", "entropy", "--exit-budget-rtf", repr(rtf_budget), *test_set, **ctc) == 0
    runs = json.loads((t["exp"] / "ctc_greedy_search" / "results-devb.json").read_text())["runs"]
    rtf = next(r for r in runs.values() if r["kind"] == "budget" and r["budget_kind"] == "rtf")
    assert 0 < rtf["dev_cost"] <= rtf_budget and rtf["achieved_cost"] > 0
    assert rtf["dev_cost_simulated"] <= rtf_budget < rtf["dev_cost_range"][1]  # some thresholds were excluded
    monkeypatch.undo()
    # compare.py lists the budget runs and marks them on the compute plot
    from splitformer.compare import main as compare_main

    assert compare_main([str(t["exp"]), "--names", "tiny", "--checkpoint", "epoch-2_avg-1", "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Compute budgets" in md and "| entropy | ctc | macs " in md
    # each budget row is set against its fixed exit with an interval over speakers and a Holm-corrected p
    budget_rows = [ln for ln in md.splitlines() if ln.startswith("| tiny | ") and " | macs " in ln]
    assert budget_rows and all(len(ln.strip("|").split(" | ")) == 14 for ln in budget_rows)


def test_transducer_scorer_reads_the_transducer_and_its_sweep_equals_a_real_run(trained_an4):
    """--exit-scorer transducer: the criteria read the joiner's posteriors along the greedy path (and the
    modified beam's N-best), by hand here for one utterance, and the sweep still equals a real dynamic run."""
    import argparse

    from splitformer.decode import load_model, test_loader
    from splitformer.decoding.exits import model_exit_scores
    from splitformer.decoding.search import greedy_search

    t = trained_an4
    args = argparse.Namespace(exp_dir=t["exp"], epoch=2, iter=0, avg=1, use_averaged_model=False)
    model, _ = load_model(args)
    loader, _ = test_loader(t["manifests"], "an4", "dev", 15)
    batch = next(iter(loader))
    feats, lens = batch["inputs"][:1], batch["supervisions"]["num_frames"][:1]
    feats = feats[:, : int(lens[0])]
    with torch.no_grad():
        enc, enc_lens = model.encode(feats, lens, exit_layer=2)
        scores = model_exit_scores(model, enc, enc_lens, 2, "transducer", nbest=4)
        # by hand: follow the greedy path frame by frame, reading the joiner's posteriors
        proj = model.project_encoder(enc, 2)
        context = [-1] * (model.decoder.context_size - 1) + [model.blank_id]
        ents, maxes = [], []
        for f in range(int(enc_lens[0])):
            dec = model.project_decoder(model.decoder(torch.tensor([context[-model.decoder.context_size:]]), need_pad=False))
            p = model.joiner(proj[0, f:f + 1], dec[:, 0]).float().softmax(-1)[0]
            ents.append(float(torch.distributions.Categorical(probs=p.double()).entropy()))
            maxes.append(float(p.max()))
            k = int(p.argmax())
            if k != model.blank_id:
                context.append(k)
        assert context[model.decoder.context_size:] == greedy_search(model, proj, enc_lens)[0].tokens
    assert scores["entropy"].item() == pytest.approx(sum(ents) / len(ents), rel=1e-4)
    assert scores["confidence"].item() == pytest.approx(sum(maxes) / len(maxes), rel=1e-4)
    assert 0 < scores["posterior"].item() <= 1

    assert _decode(t, "--exit-threshold", "sweep", "--exit-scorer", "transducer", "--max-duration", "30") == 0
    sweep = _runs(t)["epoch-2_avg-1_exit-sweep-scorer-transducer-nbest-4_greedy_search"]
    assert sweep["scorer"] == "transducer"
    point = min(sweep["curves"]["confidence"], key=lambda r: abs(r["mean_exit_layer"] - 4))
    assert 2 < point["mean_exit_layer"] < 6
    thr = repr(point["threshold"])
    assert _decode(t, "--exit-strategy", "confidence", "--exit-threshold", thr, "--exit-scorer", "transducer",
                   "--max-duration", "30") == 0
    real = _runs(t)[f"epoch-2_avg-1_exit-confidence-{thr}-scorer-transducer_greedy_search"]
    assert real["mean_exit_layer"] == pytest.approx(point["mean_exit_layer"], abs=1e-9)
    assert real["wer"] == pytest.approx(point["wer"], abs=1e-9)
