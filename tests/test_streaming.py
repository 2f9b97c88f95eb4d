"""Causal models and streaming: chunk masks, chunk-causal convolutions, chunk-by-chunk states against the masked
whole-utterance forward (both front ends, Splitformer branches, batches of unequal streams, per-chunk exits),
the streaming decoder's words, and sizes that do not line up."""
import math
from typing import Optional

import pytest
import torch

from splitformer.decoding.search import run_search
from splitformer.decoding.streaming import ChunkExitRule, StreamingDecoder, Utterance, chunk_costs
from splitformer.model.chunking import (Chunking, ChunkCausalDepthwiseConv1d, check_chunking, chunk_attn_mask,
                                        draw_chunking, parse_sizes)
from splitformer.model.config import build_model, default_model_args
from splitformer.model.streaming import StreamingEncoder

torch.set_num_threads(1)

# small causal models of every kind the presets build: a Splitformer (x4 Conv1d front end, branches in the first
# and last blocks), the same with the Conv2d front end and x2 input downsampling, and a multi-rate Zipformer2
SPLIT = dict(preset="splitformer-cpu-causal", num_encoder_layers="6", exit_layers="2,4,6", split_blocks="0,2",
             encoder_dim="48", encoder_unmasked_dim="48", feedforward_dim="64", cnn_module_kernel="7")
SPLIT_CONV2D = dict(SPLIT, preset="splitformer", causal=True, encoder_embed="conv2d", input_downsample=2,
                    chunk_size="16,32,-1", left_context_frames="64,-1", decoder_dim=64, joiner_dim=64)
ZIPFORMER = dict(preset="zipformer-cpu", causal=True, num_encoder_layers="1,1,1,1", downsampling_factor="1,2,4,2",
                 encoder_dim="32,48,48,32", encoder_unmasked_dim="32,32,32,32", feedforward_dim="48,64,64,48",
                 num_heads="2,2,2,2", cnn_module_kernel="7,7,5,7", chunk_size="16,-1", left_context_frames="64,-1")
KINDS = {"splitformer-conv1d": (SPLIT, 8, 32), "splitformer-conv2d": (SPLIT_CONV2D, 16, 64),
         "zipformer-conv2d": (ZIPFORMER, 16, 64)}


def causal_model(kind: str, seed: int = 0):
    """A random model of ``kind`` whose learned scales are away from their starting values (so that the edge
    factors, bypasses and feature statistics all matter), with its streaming chunk and left context."""
    overrides, chunk, left = KINDS[kind]
    torch.manual_seed(seed)
    model = build_model(default_model_args(**dict(overrides)), 30).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "edge_scale" in name or "bypass" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.feature_norm.set_stats(torch.randn(80), torch.rand(80) + 0.5)
    return model, chunk, left


def stream_exits(model, enc: StreamingEncoder, feats: torch.Tensor, lens: torch.Tensor,
                 front_len: Optional[torch.Tensor] = None):
    """Every exit's output of a batch of streams fed chunk by chunk (every block run), concatenated over time.
    ``front_len``: the front-end frames to run, if not all that ``lens`` give (the rest is look-ahead only)."""
    b = feats.shape[0]
    front_len = enc.front.output_lengths(lens) if front_len is None else front_len
    state = enc.init_state(b)
    got = {e: [] for e in model.exits}
    k = 0
    with torch.no_grad():
        while bool((front_len - k * enc.chunk > 0).any()):
            x = feats[:, k * enc.shift: k * enc.shift + enc.input_frames]
            x = torch.nn.functional.pad(x, (0, 0, 0, enc.input_frames - x.shape[1]))
            for e, out in enc.chunk_all_exits(x, state, front_len - k * enc.chunk).items():
                got[e].append(out)
            k += 1
    return {e: torch.cat(v, dim=1) for e, v in got.items()}


# ------------------------------------------------------------------------------------------- sizes
def test_chunk_mask_blocks_the_future_and_what_is_older_than_the_left_context():
    m = chunk_attn_mask(12, Chunking(4, 4), torch.device("cpu"))
    for q in range(12):
        for k in range(12):
            allowed = k // 4 <= q // 4 and k // 4 >= q // 4 - 1
            assert bool(m[q, k]) == (not allowed), (q, k)
    assert chunk_attn_mask(12, Chunking(), torch.device("cpu")) is None
    unlimited = chunk_attn_mask(12, Chunking(4, -1), torch.device("cpu"))
    assert not bool(unlimited[11, 0]) and bool(unlimited[0, 4])


def test_sizes_that_do_not_line_up_are_refused_with_the_valid_values():
    with pytest.raises(ValueError, match=r"not a multiple of 2.*e\.g\. 2, 4, 8, 16\) or -1"):
        check_chunking((8, 5), (32,), factor=2)
    for suggested in (2, 4, 8, 16):  # every suggestion passes the left-context rule too
        check_chunking((suggested,), (32,), factor=2)
    with pytest.raises(ValueError, match=r"e\.g\. 16, 32, 64\)$"):  # a stream cannot take -1
        check_chunking((16,), (24,), factor=2, allow_full=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_chunking((8, 16), (24,), factor=2)
    with pytest.raises(ValueError, match="shorter than the 14 frames .* at least 16"):
        check_chunking((8,), (8,), factor=2, conv_context=14)
    with pytest.raises(ValueError, match="positive frame counts or -1"):
        parse_sizes("8,0", "chunk-size")
    check_chunking((8, 16, -1), (32, 64, -1), factor=2, conv_context=14)  # the preset's own


def test_the_presets_refuse_misaligned_chunks_and_conformer_layers():
    with pytest.raises(ValueError, match="multiple of 2"):
        build_model(default_model_args(**dict(SPLIT, chunk_size="8,7")), 30)
    with pytest.raises(ValueError, match="multiple of 8"):  # zipformer-cpu downsamples up to x8
        build_model(default_model_args(preset="zipformer-cpu", causal=True, chunk_size="12,-1"), 30)
    with pytest.raises(ValueError, match="zipformer layers"):
        build_model(default_model_args(preset="ee-conformer-paper", causal=True), 30)
    model, _, _ = causal_model("splitformer-conv1d")
    with pytest.raises(ValueError, match="multiple of 2"):
        model.set_chunking(5, 20)
    with pytest.raises(ValueError, match="causal model"):
        build_model(default_model_args(preset="splitformer-cpu"), 30).set_chunking(8, 32)
    with pytest.raises(ValueError, match="finite chunk"):
        StreamingEncoder(model, 8, -1)


def test_training_draws_a_chunking_per_batch():
    draws = {draw_chunking((8, 16, -1), (32, 64)) for _ in range(200)}
    assert Chunking() in draws and Chunking(8, 32) in draws and Chunking(16, 64) in draws
    assert all(d.full or d.left in (32, 64) for d in draws)


# ------------------------------------------------------------------------------------------- convolution
def test_chunk_causal_conv_sees_nothing_after_its_chunk_and_streams_exactly():
    torch.manual_seed(0)
    conv = ChunkCausalDepthwiseConv1d(6, 7)
    with torch.no_grad():
        conv.edge_scale.add_(0.5 * torch.randn_like(conv.edge_scale))
    x = torch.randn(2, 6, 40)
    y = conv(x, chunk=8)
    x2 = x.clone()
    x2[..., 24:] += torch.randn(2, 6, 16)
    y2 = conv(x2, chunk=8)
    assert torch.equal(y[..., :24], y2[..., :24]) and not torch.allclose(y[..., 24:], y2[..., 24:])
    cache = torch.zeros(2, 6, 3)
    pieces = []
    for s in range(0, 40, 8):
        out, cache = conv.streaming_forward(x[..., s:s + 8], cache)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, -1), y, atol=1e-6, rtol=0)


def test_absent_frames_are_zeros_to_other_chunks_but_not_to_their_own():
    """Per-chunk exits: a chunk that stopped below a block is zeros to the later chunks' convolutions there, as in
    a stream (its cache slots were zeroed), while its own frames still see each other."""
    torch.manual_seed(1)
    conv = ChunkCausalDepthwiseConv1d(5, 7)
    x = torch.randn(2, 5, 32)
    absent = torch.zeros(2, 32, dtype=torch.bool)
    absent[0, 8:16] = True  # stream 0's second chunk stopped below this block
    y = conv(x, chunk=8, absent=absent)
    zeroed = conv(x.masked_fill(absent.unsqueeze(1), 0.0), chunk=8)
    present = ~absent[0]
    torch.testing.assert_close(y[0][:, present], zeroed[0][:, present], atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1], conv(x, chunk=8)[1], atol=1e-6, rtol=0)  # nothing absent: unchanged
    torch.testing.assert_close(y[0][:, 8:16], conv(x, chunk=8)[0][:, 8:16], atol=1e-6, rtol=0)  # sees itself


def test_training_with_per_chunk_exits_masks_random_chunks():
    """--chunk-exit-prob: in a chunked training batch every chunk stops at a random exit (one depth per chunk,
    every exit drawn); never at evaluation; and a batch trains through it."""
    torch.manual_seed(0)
    model = build_model(default_model_args(**dict(SPLIT, chunk_exit_prob=1.0, chunk_size="8",
                                                  left_context_frames="32")), 30)
    enc = model.encoder
    feats, lens = torch.randn(2, 300, 80), torch.tensor([300, 250])
    x, x_lens = enc.prepare(*model.encoder_embed(feats, lens))
    model.train()
    depth = enc.block_context(x, x_lens).depth
    assert depth is not None and depth.shape == x.shape[:2]
    chunks = depth[:, : depth.shape[1] // 8 * 8].reshape(2, -1, 8)
    assert torch.equal(chunks, chunks[..., :1].expand_as(chunks))  # one exit per chunk
    assert set(depth.unique().tolist()) == {0, 1, 2}
    enc.chunk_exit_prob = 0.0
    assert enc.block_context(x, x_lens).depth is None
    enc.chunk_exit_prob = 1.0
    model.eval()
    assert enc.block_context(x, x_lens).depth is None
    model.train()
    out = model(feats, lens, [[3, 4, 5], [6, 7]])
    loss = sum(v["simple"] + v["pruned"] + v["ctc"] for v in out.values())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in model.named_parameters() if "layers.5" in n)


def test_full_context_is_one_chunk_as_long_as_the_utterance():
    """--chunk-size -1 is the full forward: with edge factors at their start (1) a single chunk that holds the
    whole input gives the same convolution, and an unlimited one-chunk attention mask blocks nothing."""
    torch.manual_seed(0)
    conv = ChunkCausalDepthwiseConv1d(6, 7)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(conv(x, chunk=-1), conv(x, chunk=32), atol=1e-6, rtol=0)
    model, _, _ = causal_model("splitformer-conv1d")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChunkCausalDepthwiseConv1d):
                m.edge_scale.fill_(1.0)
        feats, lens = torch.randn(2, 300, 80), torch.tensor([300, 211])
        full = model.encode_exits(feats, lens)
        model.set_chunking(80, 80)  # 80 frames of 40 ms: longer than either utterance
        one_chunk = model.encode_exits(feats, lens)
    for (_, a, la), (_, b, _) in zip(full, one_chunk):
        for i, n in enumerate(la.tolist()):
            torch.testing.assert_close(a[i, :n], b[i, :n], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- streaming = masked
@pytest.mark.parametrize("kind", list(KINDS))
def test_chunk_by_chunk_equals_the_masked_forward_at_every_exit(kind):
    """A batch of streams of unequal length, fed chunk by chunk with cached states per layer and branch, gives
    the masked whole-utterance forward at every exit on every frame, the last padded chunk included."""
    model, chunk, left = causal_model(kind)
    feats = torch.randn(3, 411, 80)
    lens = torch.tensor([411, 263, 58])  # the last is shorter than one chunk of the Conv2d models
    model.set_chunking(chunk, left)
    with torch.no_grad():
        ref = model.encode_exits(feats, lens)
    got = stream_exits(model, StreamingEncoder(model, chunk, left), feats, lens)
    for e, out, out_lens in ref:
        for i, n in enumerate(out_lens.tolist()):
            assert n > 0
            torch.testing.assert_close(got[e][i, :n], out[i, :n], atol=1e-4, rtol=0, msg=f"{kind} exit {e} stream {i}")


@pytest.mark.parametrize("kind", ["splitformer-conv1d", "zipformer-conv2d"])
def test_a_chunk_never_reads_the_future(kind):
    model, chunk, left = causal_model(kind)
    model.set_chunking(chunk, left)
    enc = StreamingEncoder(model, chunk, left)
    feats = torch.randn(1, 400, 80)
    cut = 4 * enc.shift  # fbank frames of the first four chunks' own audio
    changed = feats.clone()
    changed[:, cut + enc.front.lookahead:] = torch.randn(1, 400 - cut - enc.front.lookahead, 80)
    with torch.no_grad():
        a = model.encode(feats, torch.tensor([400]))[0]
        b = model.encode(changed, torch.tensor([400]))[0]
    n = 4 * enc.out_frames
    assert torch.equal(a[:, :n], b[:, :n]) and not torch.allclose(a[:, n:], b[:, n:])


def test_per_chunk_exits_equal_the_masked_forward_with_those_exits():
    """Chunks that stop at random exits: the blocks above record them as absent, and every chunk's output at
    its exit equals the masked computation EarlyExitEncoder.forward(chunk_exits=...) defines."""
    model, chunk, left = causal_model("splitformer-conv1d")
    model.set_chunking(chunk, left)
    enc = StreamingEncoder(model, chunk, left)
    torch.manual_seed(3)
    feats, lens = torch.randn(2, 500, 80), torch.tensor([500, 333])
    front_len = enc.front.output_lengths(lens)
    n_chunks = int(math.ceil(int(front_len.max()) / chunk))
    depth = torch.randint(0, len(model.exits), (2, n_chunks))
    state = enc.init_state(2)
    got = []
    with torch.no_grad():
        for k in range(n_chunks):
            x = feats[:, k * enc.shift: k * enc.shift + enc.input_frames]
            x = torch.nn.functional.pad(x, (0, 0, 0, enc.input_frames - x.shape[1]))
            h, h_lens = enc.prepare(*enc.front_step(x, state, front_len - k * chunk))
            outs = torch.zeros(2, h.shape[1], h.shape[2])
            for block in range(len(model.exits)):
                reach = (depth[:, k] >= block).nonzero().flatten()
                rest = (depth[:, k] < block).nonzero().flatten()
                if len(reach):
                    from splitformer.decoding.streaming import _assign_part, _select_part

                    sub = _select_part(state, block, reach)
                    nh, out = enc.block(block, h[reach], h_lens[reach], sub)
                    _assign_part(state, block, reach, sub)
                    h = h.clone()
                    h[reach] = nh
                    stop = depth[reach, k] == block
                    outs[reach[stop]] = out[stop]
                if len(rest):
                    sub = _select_part(state, block, rest)
                    enc.skip(block, sub)
                    _assign_part(state, block, rest, sub)
            enc.finish_chunk(state)
            got.append(outs)
        x, x_lens = model.encoder_embed(model.normalize(feats), lens)
        ref = model.encoder(x, x_lens, chunk_exits=depth)
    got = torch.cat(got, dim=1)
    for i, n in enumerate(ref[0][1].tolist()):
        for t in range(n):
            want = ref[int(depth[i, t // chunk])][0][i, t]
            torch.testing.assert_close(got[i, t], want, atol=1e-4, rtol=0, msg=f"stream {i} frame {t}")
    # and the holes matter: without them the upper exits differ
    free = model.encoder(x, x_lens)
    assert not torch.allclose(free[-1][0][0, :n], ref[-1][0][0, :n], atol=1e-3)


# ------------------------------------------------------------------------------------------- the decoder
def _utterances(lengths):
    torch.manual_seed(7)
    return [Utterance(f"u{i}", torch.randn(n, 80), [], n / 100) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("method", ["greedy_search", "modified_beam_search", "ctc_greedy_search",
                                    "ctc_prefix_beam_search"])
def test_streaming_decoder_gives_the_words_of_the_masked_forward_at_every_exit(method):
    """Seven streams of unequal length through three slots (streams join as others end), every exit searched
    at once: the words of each exit equal the offline search over the masked whole-utterance output."""
    model, chunk, left = causal_model("splitformer-conv1d")
    model.set_chunking(chunk, left)
    utts = _utterances([300, 57, 5, 410, 123, 250, 33])  # 5 frames: shorter than the front end's window
    res = StreamingDecoder(model, chunk, left, method=method, exit_layer="all", max_streams=3).decode(utts)
    assert [r.cut_id for r in res] == [u.cut_id for u in utts]
    for u, r in zip(utts, res):
        t = u.feats.shape[0]
        if t < 7:
            assert all(v == [] for v in r.tokens.values()) and r.chunk_exits == []
            continue
        with torch.no_grad():
            outs = model.encode_exits(u.feats[None], torch.tensor([t]))
            for e, o, l in outs:
                assert run_search(model, method, o, l, e, 4)[0].tokens == r.tokens[e], (u.cut_id, e)


@pytest.mark.parametrize("scorer,strategy", [("ctc", "confidence"), ("ctc", "posterior"), ("ctc", "entropy"),
                                             ("transducer", "entropy"), ("transducer", "posterior")])
def test_a_per_chunk_dynamic_run_equals_the_masked_computation_it_claims(scorer, strategy):
    from splitformer.decoding.search import greedy_search

    model, chunk, left = causal_model("splitformer-conv1d")
    model.set_chunking(chunk, left)
    utts = _utterances([300, 180, 410])
    # a threshold between the chunks' scores at the first exit, so that some stop there and others climb
    trace = StreamingDecoder(model, chunk, left, exit_layer="all", rule=ChunkExitRule(model, strategy, 0.0, scorer=scorer)
                             ).decode(utts)
    first = sorted(scores[0] for r in trace for scores in r.chunk_scores)
    rule = ChunkExitRule(model, strategy, (first[len(first) // 2 - 1] + first[len(first) // 2]) / 2, scorer=scorer)
    dec = StreamingDecoder(model, chunk, left, method="greedy_search", rule=rule, max_streams=2)
    dec.costs = chunk_costs(dec.enc, rule, dec.search)
    res = dec.decode(utts)
    used = {e for r in res for e in r.chunk_exits}
    assert len(used) > 1, f"threshold {rule.threshold} should split the chunks between exits, got {used}"
    for u, r in zip(utts, res):
        idx = torch.tensor([[model.exits.index(e) for e in r.chunk_exits]])
        with torch.no_grad():
            x, x_lens = model.encoder_embed(model.normalize(u.feats[None]), torch.tensor([u.feats.shape[0]]))
            outs = model.encoder(x, x_lens, chunk_exits=idx)
            n = int(outs[0][1][0])
            proj = torch.stack([model.project_encoder(outs[int(idx[0, t // chunk])][0][:, t], r.chunk_exits[t // chunk])[0]
                                for t in range(n)])[None]
            assert greedy_search(model, proj, outs[0][1])[0].tokens == r.tokens[0]
        costs = dec.costs
        want = sum(costs.fixed(model.exits.index(e)) + sum(costs.scorer[:model.exits.index(e) + (e != model.exits[-1])])
                   for e in r.chunk_exits)
        assert r.macs == pytest.approx(want)


def test_silence_and_short_streams_decode_without_error():
    model, chunk, left = causal_model("zipformer-conv2d")
    utts = [Utterance("silence", torch.full((300, 80), -15.9), [], 3.0), Utterance("short", torch.randn(20, 80), [], 0.2),
            Utterance("one-frame", torch.randn(1, 80), [], 0.01), Utterance("mid-chunk", torch.randn(77, 80), [], 0.77)]
    res = StreamingDecoder(model, chunk, left, exit_layer="all").decode(utts)
    assert [r.cut_id for r in res] == [u.cut_id for u in utts]
    assert res[2].chunk_exits == [] and len(res[1].chunk_exits) == 1 and len(res[3].chunk_exits) == 3


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind", ["zipformer-conv2d", "splitformer-conv2d"])
def test_streaming_export_of_the_conv2d_front_end_and_a_multi_rate_zipformer(kind, tmp_path):
    """The streaming files of the other front end (its ConvNeXt cache is sherpa-onnx's front-end state) and of a
    Zipformer2 with four stacks at four rates: export checks each against PyTorch chunk by chunk, and
    sherpa-onnx's online recognizer runs them and says what our StreamingDecoder says on the same frames."""
    import numpy as np
    import sherpa_onnx

    from sherpa_support import frames_sherpa_runs, padded, piece_text, sherpa_text
    from splitformer.decoding.search import greedy_search

    from splitformer.export import export_model, read_metadata

    model, chunk, left = causal_model(kind)
    tokens = tmp_path / "tokens.txt"
    pieces = ["<blk>", "<sos/eos>", "<unk>"] + [f"\u2581t{i}" for i in range(27)]
    tokens.write_text("".join(f"{p} {i}\n" for i, p in enumerate(pieces)))
    res = export_model(model, {"encoder": "zipformer" if kind.startswith("zip") else "early-exit"}, tmp_path,
                       model.exits[-1:], streaming=True, chunk=chunk, left=left, tokens=tokens, log=lambda m: None)
    d = tmp_path / "streaming"
    assert res.files[f"streaming/encoder-exit{model.exits[-1]}"] == d / f"encoder-exit{model.exits[-1]}.onnx"
    meta = read_metadata(d / f"encoder-exit{model.exits[-1]}.onnx")
    assert (int(meta["T"]), int(meta["decode_chunk_len"])) == (2 * chunk + 13, 2 * chunk)
    stacks = len(meta["encoder_dims"].split(","))
    assert stacks == (4 if kind.startswith("zip") else 3)  # four rates; main layers and two branches
    rec = sherpa_onnx.OnlineRecognizer.from_transducer(
        tokens=str(d / "tokens.txt"), encoder=str(d / f"encoder-exit{model.exits[-1]}.onnx"),
        decoder=str(d / "decoder.onnx"), joiner=str(d / "joiner.onnx"), num_threads=1)
    window, shift = int(meta["T"]), int(meta["decode_chunk_len"])
    for seed in range(3):
        wave = padded(np.random.default_rng(seed).normal(0, 0.1, 24000 + 4000 * seed))
        feats = torch.from_numpy(frames_sherpa_runs(wave, window, shift))[None]
        # the chunks sherpa-onnx runs, each with its look-ahead frames (it never runs a last, partial chunk)
        chunks = (feats.shape[1] - window) // shift + 1
        out = stream_exits(model, StreamingEncoder(model, chunk, left), feats, torch.tensor([feats.shape[1]]),
                           front_len=torch.tensor([chunks * chunk]))[model.exits[-1]]
        with torch.no_grad():
            ours = greedy_search(model, model.project_encoder(out, model.exits[-1]), torch.tensor([out.shape[1]]))[0]
        assert ours.tokens, "an untrained model that says nothing cannot tell the two apart"
        assert sherpa_text(rec, wave) == piece_text([pieces[t] for t in ours.tokens]), seed
