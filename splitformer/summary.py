"""Parameter counts and encoder compute (MACs per second of audio), per exit.

    python -m splitformer.summary --preset splitformer-paper --vocab-size 256
    python -m splitformer.summary --preset w2v2-base-exits --hf-weights random   # no checkpoint needed

MACs are counted with ``torch.utils.flop_counter`` on a real forward pass, so attention
score products and convolutions count too, not only ``nn.Linear`` layers; one MAC is
two FLOPs. Only the layers up to each exit run, so the figure is what that exit costs.
"""
import argparse
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from splitformer.model.asr_model import AsrModel
from splitformer.model.config import add_model_arguments, build_model, parse_with_preset


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_by_module(model: nn.Module) -> "OrderedDict[str, int]":
    """Parameters of each top-level child, e.g. encoder_embed, encoder, decoder, joiner, heads."""
    return OrderedDict((name, count_params(child)) for name, child in model.named_children())


@torch.no_grad()
def encoder_macs_per_second(
    model: AsrModel, exit_layer: Optional[int] = None, seconds: float = 10.0
) -> int:
    """MACs of front end + encoder up to ``exit_layer`` for one utterance, per second of audio (for a waveform
    backbone that includes its convolutional feature encoder, a large share of its cost)."""
    was_training = model.training
    model.eval()
    x, x_lens = model.dummy_input(seconds)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model.encode(x, x_lens, exit_layer=exit_layer)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() / 2 / seconds)


def exit_macs(model: AsrModel, seconds: float = 10.0) -> Dict[int, int]:
    return {e: encoder_macs_per_second(model, e, seconds) for e in model.exits}


def format_summary(model: AsrModel, seconds: float = 10.0) -> List[str]:
    lines = [f"{name}: {n}" for name, n in params_by_module(model).items()]
    lines.append(f"total_params: {count_params(model)}")
    macs = exit_macs(model, seconds)
    lines.append(f"macs_per_second: {macs[model.exits[-1]]}")
    if len(model.exits) > 1:
        lines += [f"exit_layer: {e} macs_per_second: {m}" for e, m in macs.items()]
    return lines


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=500, help="BPE vocabulary size (icefall's figures use 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="utterance length used to count MACs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_with_preset(get_parser(), argv)
    try:
        model = build_model(args, args.vocab_size)
    except ValueError as e:  # e.g. a backbone checkpoint that cannot be loaded here
        raise SystemExit(f"summary: error: {e}") from None
    for line in format_summary(model, args.seconds):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
