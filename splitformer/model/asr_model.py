"""Transducer + CTC model over any encoder with one or more exits.

Every exit has its own CTC head, its own joiner input projection and its own "simple"
(trivial-joiner) projection; the stateless decoder and the joiner are shared, so an exit
costs a few small linear layers and the decoder output is computed once for all exits.
"""
from typing import Dict, Generator, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from splitformer import losses
from splitformer.model.decoder import Decoder
from splitformer.model.joiner import Joiner


INPUT_RATES = {"fbank": 100, "waveform": 16000}  # fbank frames (10 ms shift) or samples per second
SAMPLES_PER_FRAME = INPUT_RATES["waveform"] // INPUT_RATES["fbank"]  # 16 kHz samples per 10 ms fbank frame


def zip_exits(exits: Sequence[int], gen: Generator) -> Generator:
    """``(exit, out, lens)`` from a generator of ``(out, lens)`` that takes ``send``, passing what is sent on."""
    try:
        out, lens = next(gen)
        for e in exits:
            keep = yield e, out, lens
            out, lens = gen.send(keep)
    except StopIteration:
        return
    finally:
        gen.close()


def pad_targets(targets: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (B, U_max) int64 padded with ``pad``, and (B,) lengths."""
    lens = torch.tensor([len(t) for t in targets], dtype=torch.int64, device=device)
    out = torch.full((len(targets), max(1, int(lens.max()) if len(targets) else 1)), pad, dtype=torch.int64)
    for i, t in enumerate(targets):
        if len(t):
            out[i, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    return out.to(device), lens


def stack_groups(outs: Sequence[Tuple[int, torch.Tensor, torch.Tensor]]) -> List[List[Tuple[int, torch.Tensor, torch.Tensor]]]:
    """Split exits ``(layer, out (B, T, D), lens)`` into runs of consecutive exits with equal shapes and
    lengths, which the losses can take stacked along the batch axis."""
    groups: List[List[Tuple[int, torch.Tensor, torch.Tensor]]] = []
    for item in outs:
        if groups:
            _, o, l = groups[-1][0]
            if o.shape == item[1].shape and torch.equal(l, item[2]):
                groups[-1].append(item)
                continue
        groups.append([item])
    return groups


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` per feature bin, with the training set's statistics held as buffers.

    Identity until ``set_stats`` is called (train.py does it before the first update), so a model built
    for a test, or loaded from a checkpoint, applies exactly the numbers it was trained with.
    """

    def __init__(self, dim: int = 80) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.mean.shape or std.shape != self.mean.shape:
            raise ValueError(f"feature statistics of shape {tuple(mean.shape)}/{tuple(std.shape)}, "
                             f"expected {tuple(self.mean.shape)}")
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) * self.inv_std.to(x.dtype)


class AsrModel(nn.Module):
    def __init__(
        self,
        encoder_embed: nn.Module,
        encoder: nn.Module,
        vocab_size: int,
        decoder_dim: int = 512,
        joiner_dim: int = 512,
        context_size: int = 2,
        blank_id: int = 0,
        use_transducer: bool = True,
        use_ctc: bool = True,
        ctc_dropout: float = 0.1,
        feature_norm: bool = False,
        feature_dim: int = 80,
    ):
        super().__init__()
        if not (use_transducer or use_ctc):
            raise ValueError("at least one of use_transducer and use_ctc must be true")
        # global mean/variance normalisation of the fbank (statistics set by train.py); None: raw features
        self.feature_norm = FeatureNorm(feature_dim) if feature_norm else None
        self.feature_dim = feature_dim
        self.encoder_embed = encoder_embed
        self.encoder = encoder
        self.vocab_size = vocab_size
        self.blank_id = blank_id
        # icefall's token layout (<blk>=0, <sos/eos>=1, <unk>=2, checked by the Tokenizer): transducer searches never
        # emit <unk>, as icefall's and sherpa-onnx's do not, so that deployed models give the same words
        self.unk_id = 2 if vocab_size > 2 else None
        self.use_transducer = use_transducer
        self.use_ctc = use_ctc
        dims: List[int] = list(encoder.output_dims)
        if len(dims) != len(encoder.exits):
            raise ValueError(f"encoder has {len(encoder.exits)} exits but {len(dims)} output dims")

        if use_transducer:
            self.decoder = Decoder(vocab_size, decoder_dim, blank_id=blank_id, context_size=context_size)
            self.decoder_proj = nn.Linear(decoder_dim, joiner_dim)
            self.joiner = Joiner(joiner_dim, vocab_size)
            self.encoder_proj = nn.ModuleList(nn.Linear(d, joiner_dim) for d in dims)
            self.simple_am_proj = nn.ModuleList(nn.Linear(d, vocab_size) for d in dims)
            self.simple_lm_proj = nn.Linear(decoder_dim, vocab_size)
        if use_ctc:
            self.ctc_output = nn.ModuleList(
                nn.Sequential(nn.Dropout(ctc_dropout), nn.Linear(d, vocab_size)) for d in dims
            )

    # ------------------------------------------------------------------ exits
    @property
    def exits(self) -> List[int]:
        return list(self.encoder.exits)

    def exit_index(self, exit_layer: Optional[int]) -> int:
        """Position of ``exit_layer`` in ``exits`` (the last exit for None); a clear error otherwise."""
        if exit_layer is None:
            return len(self.exits) - 1
        if exit_layer not in self.exits:
            raise ValueError(f"no exit after layer {exit_layer}; valid exits: {', '.join(map(str, self.exits))}")
        return self.exits.index(exit_layer)

    # ------------------------------------------------------------------ streaming
    @property
    def causal(self) -> bool:
        """Trained chunk-causal (``--causal true``): it can decode a stream chunk by chunk."""
        chunks = getattr(self.encoder, "chunks", None)
        return bool(chunks is not None and chunks.causal)

    def set_chunking(self, chunk: int, left: int) -> None:
        """Chunk size and left context (frames after the front end) of every evaluation forward from now on:
        the masked whole-utterance computation that streaming with them equals. -1: full context."""
        chunks = getattr(self.encoder, "chunks", None)
        if chunks is None:
            if chunk > 0:
                raise ValueError("--chunk-size needs a causal model (trained with --causal true)")
            return
        chunks.set(chunk, left)

    # ------------------------------------------------------------------ input
    @property
    def input_kind(self) -> str:
        """'fbank': (B, T, 80) log-mel frames at 100 Hz; 'waveform': (B, S) 16 kHz samples (--encoder hf)."""
        return getattr(self.encoder_embed, "input_kind", "fbank")

    @property
    def input_rate(self) -> int:
        """Input frames (or samples) per second of audio."""
        return INPUT_RATES[self.input_kind]

    def dummy_input(self, seconds: float, batch: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Silence of ``seconds`` in the input this model reads, with its lengths (for cost counting, export)."""
        n = int(seconds * self.input_rate)
        shape = (batch, n) if self.input_kind == "waveform" else (batch, n, self.feature_dim)
        return torch.zeros(shape), torch.full((batch,), n, dtype=torch.int64)

    # ------------------------------------------------------------------ encoder
    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.feature_norm is None else self.feature_norm(features)

    def encode_exits(
        self, features: torch.Tensor, feature_lens: torch.Tensor, max_exit: Optional[int] = None
    ) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Run the encoder once up to ``max_exit`` (the top if None); return every exit on the way."""
        if max_exit is not None:
            self.exit_index(max_exit)
        x, x_lens = self.encoder_embed(self.normalize(features), feature_lens)
        outs = self.encoder(x, x_lens, max_exit=max_exit)
        return [(e, o, l) for e, (o, l) in zip(self.exits, outs)]

    def encode(
        self, features: torch.Tensor, feature_lens: torch.Tensor, exit_layer: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder output at one exit; the layers above it are never run."""
        exit_layer = self.exits[self.exit_index(exit_layer)]
        _, out, lens = self.encode_exits(features, feature_lens, max_exit=exit_layer)[-1]
        return out, lens

    def iter_exits(
        self, features: torch.Tensor, feature_lens: torch.Tensor
    ) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield exits one at a time, computing the next block only when asked (dynamic exits)."""
        x, x_lens = self.encoder_embed(self.normalize(features), feature_lens)
        if hasattr(self.encoder, "iter_exits"):
            for e, (o, l) in zip(self.exits, self.encoder.iter_exits(x, x_lens)):
                yield e, o, l
        else:  # single-exit or non-incremental encoders
            for e, (o, l) in zip(self.exits, self.encoder(x, x_lens)):
                yield e, o, l

    def climb(
        self, features: torch.Tensor, feature_lens: torch.Tensor
    ) -> Generator[Tuple[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor], None]:
        """Exits one at a time for a batch that utterances leave: after each ``(exit, out, lens)``, ``send`` the
        indices (into the rows just yielded) of those that climb on; only they run the next block, trimmed to
        the longest of them (a batched dynamic exit pays nothing for an utterance that stopped). ``next`` keeps
        every row. Encoders without a per-block form (a pretrained backbone) run every row to the top and the
        rows that left are dropped from the outputs: the same results, at full cost."""
        x, x_lens = self.encoder_embed(self.normalize(features), feature_lens)
        enc = self.encoder
        if hasattr(enc, "climb"):
            yield from zip_exits(self.exits, enc.climb(x, x_lens))
            return
        rows: Optional[torch.Tensor] = None
        outs = enc.iter_exits(x, x_lens) if hasattr(enc, "iter_exits") else iter(enc(x, x_lens))
        for e, (o, l) in zip(self.exits, outs):
            if rows is not None:
                o, l = o[rows], l[rows]
            keep = yield e, o, l
            if keep is not None:
                rows = keep if rows is None else rows[keep]

    # ------------------------------------------------------------------ heads
    def ctc_log_probs(self, enc_out: torch.Tensor, exit_layer: Optional[int] = None) -> torch.Tensor:
        if not self.use_ctc:
            raise RuntimeError("this model has no CTC head (trained with --use-ctc false)")
        return self.ctc_output[self.exit_index(exit_layer)](enc_out).log_softmax(dim=-1)

    def project_encoder(self, enc_out: torch.Tensor, exit_layer: Optional[int] = None) -> torch.Tensor:
        if not self.use_transducer:
            raise RuntimeError("this model has no transducer (trained with --use-transducer false)")
        return self.encoder_proj[self.exit_index(exit_layer)](enc_out)

    def project_decoder(self, decoder_out: torch.Tensor) -> torch.Tensor:
        return self.decoder_proj(decoder_out)

    # ------------------------------------------------------------------ losses
    def _transducer_losses(
        self,
        idxs: Sequence[int],
        enc_outs: Sequence[torch.Tensor],
        enc_lens: torch.Tensor,
        decoder_out: torch.Tensor,
        lm: torch.Tensor,
        y_padded: torch.Tensor,
        y_lens: torch.Tensor,
        prune_range: int,
        am_scale: float,
        lm_scale: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Simple and pruned losses of the exits ``idxs``, per utterance: ``(E * B,)`` each, exit-major.

        The exits are stacked along the batch axis (they share T), so the two recursions, the pruning
        and the joiner run once for all of them instead of once per exit.
        """
        n = len(idxs)
        enc_out = torch.cat(list(enc_outs), dim=0) if n > 1 else enc_outs[0]
        if n > 1:
            y_padded, y_lens, enc_lens = y_padded.repeat(n, 1), y_lens.repeat(n), enc_lens.repeat(n)
            decoder_out, lm = decoder_out.repeat(n, 1, 1), lm.repeat(n, 1, 1)
        boundary = torch.zeros((enc_out.size(0), 4), dtype=torch.int64, device=enc_out.device)
        boundary[:, 2] = y_lens
        boundary[:, 3] = enc_lens
        am = torch.cat([self.simple_am_proj[i](x) for i, x in zip(idxs, enc_outs)], dim=0)
        enc_proj = torch.cat([self.encoder_proj[i](x) for i, x in zip(idxs, enc_outs)], dim=0)
        with torch.autocast(device_type=enc_out.device.type, enabled=False):
            simple_loss, (px_grad, py_grad) = losses.rnnt_loss_smoothed(
                lm=lm.float(),
                am=am.float(),
                symbols=y_padded,
                termination_symbol=self.blank_id,
                lm_only_scale=lm_scale,
                am_only_scale=am_scale,
                boundary=boundary,
                reduction="none",
                return_grad=True,
            )
        ranges = losses.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=prune_range)
        am_pruned, lm_pruned = losses.do_rnnt_pruning(am=enc_proj, lm=self.decoder_proj(decoder_out), ranges=ranges)
        logits = self.joiner(am_pruned, lm_pruned)
        with torch.autocast(device_type=enc_out.device.type, enabled=False):
            pruned_loss = losses.rnnt_loss_pruned(
                logits=logits.float(),
                symbols=y_padded,
                ranges=ranges,
                termination_symbol=self.blank_id,
                boundary=boundary,
                reduction="none",
            )
        return simple_loss, pruned_loss

    def forward(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        targets: Sequence[Sequence[int]],
        prune_range: int = 5,
        am_scale: float = 0.0,
        lm_scale: float = 0.25,
        exit_layers: Optional[Sequence[int]] = None,
        exit_outputs: Optional[List[Tuple[int, torch.Tensor, torch.Tensor]]] = None,
    ) -> Dict[int, Dict[str, torch.Tensor]]:
        """Per-exit losses, each summed over the batch.

        ``exit_layers`` limits which exits get a loss (e.g. only the last for a single-exit
        model); the encoder runs only up to the highest of them. Exits that share a frame count
        (every exit of a one-rate early-exit stack) go through each loss in one call, stacked along
        the batch; exits that differ in length fall back to one call each. ``exit_outputs``: a list
        that receives the encoder's ``(exit layer, out, lens)``, for a caller that decodes them too
        (validation's WER) without a second encoder pass.
        """
        wanted = list(self.exits) if exit_layers is None else sorted(set(exit_layers))
        for e in wanted:
            self.exit_index(e)
        if len(targets) != features.size(0):
            raise ValueError(f"{len(targets)} transcripts for a batch of {features.size(0)} utterances")
        outs = self.encode_exits(features, feature_lens, max_exit=max(wanted))
        if exit_outputs is not None:
            exit_outputs.extend(outs)
        return self.losses_from_exits(outs, targets, prune_range, am_scale, lm_scale, wanted)

    def losses_from_exits(
        self,
        outs: Sequence[Tuple[int, torch.Tensor, torch.Tensor]],
        targets: Sequence[Sequence[int]],
        prune_range: int = 5,
        am_scale: float = 0.0,
        lm_scale: float = 0.25,
        exit_layers: Optional[Sequence[int]] = None,
    ) -> Dict[int, Dict[str, torch.Tensor]]:
        """The losses of ``forward`` from encoder outputs ``[(exit layer, out, lens)]`` already computed."""
        wanted = list(self.exits) if exit_layers is None else sorted(set(exit_layers))
        device = outs[0][1].device
        b = outs[0][1].size(0)
        result: Dict[int, Dict[str, torch.Tensor]] = {}
        if self.use_transducer:
            y_padded, y_lens = pad_targets(targets, pad=self.blank_id, device=device)
            sos_y = torch.cat([torch.full_like(y_padded[:, :1], self.blank_id), y_padded], dim=1)
            decoder_out = self.decoder(sos_y)
            lm = self.simple_lm_proj(decoder_out)
        for group in stack_groups([(e, o, l) for e, o, l in outs if e in wanted]):
            layers = [e for e, _, _ in group]
            idxs = [self.exit_index(e) for e in layers]
            enc_outs = [o for _, o, _ in group]
            enc_lens = group[0][2]
            n = len(group)
            res: Dict[str, torch.Tensor] = {}
            if self.use_transducer:
                simple, pruned = self._transducer_losses(
                    idxs, enc_outs, enc_lens, decoder_out, lm, y_padded, y_lens, prune_range, am_scale, lm_scale
                )
                res["simple"], res["pruned"] = simple.view(n, b).sum(1), pruned.view(n, b).sum(1)
            if self.use_ctc:
                log_probs = torch.cat([self.ctc_output[i](o) for i, o in zip(idxs, enc_outs)], dim=0)
                per_utt, _ = losses.ctc_loss(log_probs.float().log_softmax(dim=-1), enc_lens.repeat(n),
                                             list(targets) * n, blank=self.blank_id, reduction="none")
                res["ctc"] = per_utt.view(n, b).sum(1)
                # the exits of a group share their lengths, so the same utterances are infeasible in each
                res["ctc_num_inf"] = torch.full((n,), losses.ctc_infeasible(enc_lens, targets), device=device)
            for k, e in enumerate(layers):
                result[e] = {name: v[k] for name, v in res.items()}
        return result
