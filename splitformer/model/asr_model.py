"""Transducer + CTC model over any encoder with one or more exits.

Every exit has its own CTC head, its own joiner input projection and its own "simple"
(trivial-joiner) projection; the stateless decoder and the joiner are shared, so an exit
costs a few small linear layers and the decoder output is computed once for all exits.
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from splitformer import losses
from splitformer.model.decoder import Decoder
from splitformer.model.joiner import Joiner


def pad_targets(targets: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (B, U_max) int64 padded with ``pad``, and (B,) lengths."""
    lens = torch.tensor([len(t) for t in targets], dtype=torch.int64, device=device)
    out = torch.full((len(targets), max(1, int(lens.max()) if len(targets) else 1)), pad, dtype=torch.int64)
    for i, t in enumerate(targets):
        if len(t):
            out[i, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    return out.to(device), lens


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
    ):
        super().__init__()
        if not (use_transducer or use_ctc):
            raise ValueError("at least one of use_transducer and use_ctc must be true")
        self.encoder_embed = encoder_embed
        self.encoder = encoder
        self.vocab_size = vocab_size
        self.blank_id = blank_id
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

    # ------------------------------------------------------------------ encoder
    def encode_exits(
        self, features: torch.Tensor, feature_lens: torch.Tensor, max_exit: Optional[int] = None
    ) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Run the encoder once up to ``max_exit`` (the top if None); return every exit on the way."""
        if max_exit is not None:
            self.exit_index(max_exit)
        x, x_lens = self.encoder_embed(features, feature_lens)
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
        x, x_lens = self.encoder_embed(features, feature_lens)
        if hasattr(self.encoder, "iter_exits"):
            for e, (o, l) in zip(self.exits, self.encoder.iter_exits(x, x_lens)):
                yield e, o, l
        else:  # single-exit or non-incremental encoders
            for e, (o, l) in zip(self.exits, self.encoder(x, x_lens)):
                yield e, o, l

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
        idx: int,
        enc_out: torch.Tensor,
        enc_lens: torch.Tensor,
        decoder_out: torch.Tensor,
        lm: torch.Tensor,
        y_padded: torch.Tensor,
        y_lens: torch.Tensor,
        prune_range: int,
        am_scale: float,
        lm_scale: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        boundary = torch.zeros((enc_out.size(0), 4), dtype=torch.int64, device=enc_out.device)
        boundary[:, 2] = y_lens
        boundary[:, 3] = enc_lens
        am = self.simple_am_proj[idx](enc_out)
        with torch.autocast(device_type=enc_out.device.type, enabled=False):
            simple_loss, (px_grad, py_grad) = losses.rnnt_loss_smoothed(
                lm=lm.float(),
                am=am.float(),
                symbols=y_padded,
                termination_symbol=self.blank_id,
                lm_only_scale=lm_scale,
                am_only_scale=am_scale,
                boundary=boundary,
                reduction="sum",
                return_grad=True,
            )
        ranges = losses.get_rnnt_prune_ranges(px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=prune_range)
        am_pruned, lm_pruned = losses.do_rnnt_pruning(
            am=self.encoder_proj[idx](enc_out), lm=self.decoder_proj(decoder_out), ranges=ranges
        )
        logits = self.joiner(am_pruned, lm_pruned)
        with torch.autocast(device_type=enc_out.device.type, enabled=False):
            pruned_loss = losses.rnnt_loss_pruned(
                logits=logits.float(),
                symbols=y_padded,
                ranges=ranges,
                termination_symbol=self.blank_id,
                boundary=boundary,
                reduction="sum",
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
    ) -> Dict[int, Dict[str, torch.Tensor]]:
        """Per-exit losses, each summed over the batch.

        ``exit_layers`` limits which exits get a loss (e.g. only the last for a single-exit
        model); the encoder runs only up to the highest of them.
        """
        wanted = list(self.exits) if exit_layers is None else sorted(set(exit_layers))
        for e in wanted:
            self.exit_index(e)
        if len(targets) != features.size(0):
            raise ValueError(f"{len(targets)} transcripts for a batch of {features.size(0)} utterances")
        outs = self.encode_exits(features, feature_lens, max_exit=max(wanted))

        device = features.device
        result: Dict[int, Dict[str, torch.Tensor]] = {}
        if self.use_transducer:
            y_padded, y_lens = pad_targets(targets, pad=self.blank_id, device=device)
            sos_y = torch.cat([torch.full_like(y_padded[:, :1], self.blank_id), y_padded], dim=1)
            decoder_out = self.decoder(sos_y)
            lm = self.simple_lm_proj(decoder_out)
        for exit_layer, enc_out, enc_lens in outs:
            if exit_layer not in wanted:
                continue
            idx = self.exit_index(exit_layer)
            res: Dict[str, torch.Tensor] = {}
            if self.use_transducer:
                res["simple"], res["pruned"] = self._transducer_losses(
                    idx, enc_out, enc_lens, decoder_out, lm, y_padded, y_lens, prune_range, am_scale, lm_scale
                )
            if self.use_ctc:
                log_probs = self.ctc_output[idx](enc_out).float().log_softmax(dim=-1)
                res["ctc"], num_inf = losses.ctc_loss(log_probs, enc_lens, targets, blank=self.blank_id, reduction="sum")
                res["ctc_num_inf"] = torch.as_tensor(num_inf, device=device)
            result[exit_layer] = res
        return result
