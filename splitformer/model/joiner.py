"""Transducer joiner shared by all exits: each exit brings its own encoder projection."""
import torch
import torch.nn as nn


class Joiner(nn.Module):
    def __init__(self, joiner_dim: int, vocab_size: int):
        super().__init__()
        self.output_linear = nn.Linear(joiner_dim, vocab_size)

    def forward(self, encoder_out: torch.Tensor, decoder_out: torch.Tensor) -> torch.Tensor:
        """Both inputs are already projected to ``joiner_dim`` and broadcast against each other."""
        return self.output_linear(torch.tanh(encoder_out + decoder_out))
