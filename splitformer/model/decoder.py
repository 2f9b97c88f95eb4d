"""Stateless transducer prediction network: an embedding and a short causal conv.

A "stateless" decoder sees only the last ``context_size`` tokens, which is what makes
transducer beam search cheap (hypotheses with the same tail share decoder output).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, decoder_dim: int, blank_id: int = 0, context_size: int = 2):
        super().__init__()
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        self.vocab_size = vocab_size
        self.decoder_dim = decoder_dim
        self.blank_id = blank_id
        self.context_size = context_size
        self.embedding = nn.Embedding(vocab_size, decoder_dim)
        if context_size > 1:
            # Grouped conv over the last `context_size` embeddings: a cheap bigram-like mixer.
            groups = decoder_dim // 4 if decoder_dim % 4 == 0 else 1
            self.conv = nn.Conv1d(decoder_dim, decoder_dim, context_size, groups=groups, bias=False)
        else:
            self.conv = None

    def forward(self, y: torch.Tensor, need_pad: bool = True) -> torch.Tensor:
        """y: (B, U) token ids (negative ids are padding and embed to zero).

        With ``need_pad`` the first outputs see left-padding (start of utterance); without it,
        ``y`` must already hold ``context_size`` tokens per row and one output frame comes back.
        """
        if not need_pad:
            y = _start_as_padding(y, self.blank_id)
        mask = (y >= 0).unsqueeze(-1)
        emb = self.embedding(y.clamp(min=0)) * mask
        if self.conv is not None:
            emb = emb.transpose(1, 2)
            if need_pad:
                emb = F.pad(emb, (self.context_size - 1, 0))
            elif emb.size(-1) != self.context_size:
                raise ValueError(f"need_pad=False expects {self.context_size} tokens per row, got {emb.size(-1)}")
            emb = self.conv(emb).transpose(1, 2)
        return F.relu(emb)


def _start_as_padding(y: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Contexts that open with a run of blanks are the start of an utterance: all but the last blank of that
    run become padding (-1).

    Our searches start from ``[-1, ..., -1, blank]`` (padding, then the start symbol), as training sees the
    first position; sherpa-onnx and k2 start from ``[blank] * context_size``. A real context never holds a
    blank (blanks are never appended), so reading the leading run this way lets both start alike, and the
    exported decoder.onnx agrees with sherpa-onnx from the first token on.
    """
    run = (y != blank_id).long().cumsum(dim=-1) == 0  # True while the leading run of blanks lasts (ONNX has CumSum)
    keep_last = run.long().sum(dim=-1, keepdim=True) - 1  # index of the run's last blank
    idx = torch.arange(y.size(-1), device=y.device)
    return y.masked_fill(run & (idx < keep_last), -1)
