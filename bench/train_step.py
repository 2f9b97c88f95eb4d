#!/usr/bin/env python3
"""One training step of each preset on a fixed AN4-like batch, split into its parts.

Parts (median wall seconds over --repeats steps, after --warmup steps):
  front end   feature norm + encoder_embed
  encoder     the encoder forward up to the top exit
  losses      every trained exit's heads and losses (transducer simple + pruned, CTC), in one stacked call
  backward    loss.backward()
  optimizer   ScaledAdam.step() + zero_grad()
"step" is the sum; the last column is the step's ratio to the first preset's. A second table times the
losses alone with only the top exit trained and with every exit trained, on the same encoder output: the
stacked loss call is what keeps six exits from costing six times one. A third (--breakdown PRESET) splits that
preset's loss time by op class under the profiler, top exit against all exits: what grows with the exits.

  python bench/train_step.py --presets zipformer-cpu,ee-zipformer-cpu,splitformer-cpu
  python bench/train_step.py --device cuda        # where a GPU is present

The batch is 12 utterances of 6 s (600 fbank frames) with 20-token transcripts from a 30-piece vocabulary:
about one AN4 batch at --max-duration 100 (AN4 utterances average ~3 s, transcripts ~12 pieces).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitformer.model.config import build_model, default_model_args  # noqa: E402
from splitformer.optim import ScaledAdam  # noqa: E402

PARTS = ("front end", "encoder", "losses", "backward", "optimizer")


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_batch(b: int, frames: int, tokens: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(b, frames, 80, generator=g) * 3.6 - 7.8).to(device)
    lens = torch.full((b,), frames, dtype=torch.int64)
    lens[b // 2:] = int(frames * 0.8)  # a padded half, as real batches have
    ys = torch.randint(1, vocab, (b, tokens), generator=g).tolist()
    return feats, lens.to(device), ys


def step_parts(model, opt, feats, lens, ys, device, weights: Dict[int, float]) -> Dict[str, float]:
    """Times one training step, part by part (the model's forward is unrolled here to split it)."""
    from splitformer.trainer.objective import combine_losses

    t = [sync(device)]
    x, x_lens = model.encoder_embed(model.normalize(feats), lens)
    t.append(sync(device))
    outs = model.encoder(x, x_lens)
    t.append(sync(device))
    res = model.losses_from_exits(list(zip(model.exits, *zip(*outs))), ys, exit_layers=list(weights))
    loss, _ = combine_losses(res, weights, 0.5, 1.0, 0.2)
    t.append(sync(device))
    loss.backward()
    t.append(sync(device))
    opt.step()
    opt.zero_grad(set_to_none=True)
    t.append(sync(device))
    return {p: t[i + 1] - t[i] for i, p in enumerate(PARTS)}


def median_parts(fn: Callable[[], Dict[str, float]], warmup: int, repeats: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    return {p: statistics.median(r[p] for r in runs) for p in runs[0]}


def loss_only(model, feats, lens, ys, exits: List[int], device, warmup: int, repeats: int, stacked: bool = True) -> float:
    """Median seconds of the losses (forward + backward through the heads) of ``exits`` on fixed encoder outputs;
    ``stacked=False`` makes one loss call per exit (what the model did before exits were stacked)."""
    with torch.no_grad():
        x, x_lens = model.encoder_embed(model.normalize(feats), lens)
        outs = [(e, o.detach(), l) for e, (o, l) in zip(model.exits, model.encoder(x, x_lens))]

    def once() -> float:
        leaves = [(e, o.clone().requires_grad_(True), l) for e, o, l in outs]
        t0 = sync(device)
        if stacked:
            res = model.losses_from_exits(leaves, ys, exit_layers=exits)
        else:
            res = {}
            for e in exits:
                res.update(model.losses_from_exits(leaves, ys, exit_layers=[e]))
        total = sum(v["pruned"] + 0.5 * v["simple"] + 0.2 * v["ctc"] for v in res.values())
        total.backward()
        model.zero_grad(set_to_none=True)
        return sync(device) - t0

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


# aten ops by what they do in the losses: the projections and joiner are matrix products over (E*B, T, prune range)
OP_CLASSES = (
    ("matrix products (projections, joiner)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("tanh, softmax, gather, logsumexp", ("aten::tanh", "aten::tanh_backward", "aten::log_softmax", "aten::_log_softmax",
                                          "aten::_log_softmax_backward_data", "aten::gather", "aten::logsumexp",
                                          "aten::scatter_add_", "aten::exp")),
)


def loss_breakdown(model, feats, lens, ys, device, repeats: int) -> None:
    """Self CPU seconds per op class of the top-exit-only and the all-exit (stacked) losses, forward + backward:
    which part of the loss grows with the number of exits."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        x, x_lens = model.encoder_embed(model.normalize(feats), lens)
        outs = [(e, o.detach(), l) for e, (o, l) in zip(model.exits, model.encoder(x, x_lens))]

    def classify(exits: List[int]) -> Dict[str, float]:
        loss_only(model, feats, lens, ys, exits, device, 1, 1)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                leaves = [(e, o.clone().requires_grad_(True), l) for e, o, l in outs]
                res = model.losses_from_exits(leaves, ys, exit_layers=exits)
                sum(v["pruned"] + 0.5 * v["simple"] + 0.2 * v["ctc"] for v in res.values()).backward()
                model.zero_grad(set_to_none=True)
        out = {name: 0.0 for name, _ in OP_CLASSES}
        out["everything else"] = 0.0
        for ev in prof.key_averages():
            name = next((n for n, ops in OP_CLASSES if ev.key in ops), "everything else")
            out[name] += ev.self_cpu_time_total / 1e6 / repeats
        return out

    one, every = classify(model.exits[-1:]), classify(model.exits)
    print()
    print(f"loss time by op class (self CPU seconds per step, mean of {repeats}, profiler on), top exit vs all "
          f"{len(model.exits)} exits stacked:")
    print("| op class | top exit | all exits | ratio |")
    print("|---|---:|---:|---:|")
    for k in one:
        print(f"| {k} | {one[k]:.4f} | {every[k]:.4f} | {every[k] / max(one[k], 1e-9):.2f} |")
    print(f"| total | {sum(one.values()):.4f} | {sum(every.values()):.4f} | "
          f"{sum(every.values()) / sum(one.values()):.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="zipformer-cpu,ee-zipformer-cpu,splitformer-cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch", default="12,600,20", help="utterances, fbank frames, tokens")
    p.add_argument("--vocab", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--breakdown", default="ee-zipformer-cpu",
                   help="also split this preset's loss time by op class, top exit against all exits ('' to skip)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b, frames, tokens = (int(x) for x in args.batch.split(","))
    feats, lens, ys = make_batch(b, frames, tokens, args.vocab, device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {b} x {frames} frames, {tokens} tokens, "
          f"median of {args.repeats} steps (seconds)")
    print(f"| preset | params (M) | {' | '.join(PARTS)} | step | vs first |")
    print("|---|---:|" + "---:|" * (len(PARTS) + 2))
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(default_model_args(preset=preset), args.vocab).to(device).train()
        opt = ScaledAdam(list(model.named_parameters()), lr=0.045)
        weights = {e: 1.0 for e in model.exits}
        parts = median_parts(lambda: step_parts(model, opt, feats, lens, ys, device, weights), args.warmup, args.repeats)
        step = sum(parts.values())
        rows.append((preset, model, step))
        base = rows[0][2]
        print(f"| {preset} | {sum(q.numel() for q in model.parameters()) / 1e6:.2f} | "
              + " | ".join(f"{parts[q]:.3f}" for q in PARTS) + f" | {step:.3f} | {step / base:.2f} |")
    print()
    print("| preset | exits | losses, top exit only | every exit, one call per exit | every exit, stacked | "
          "stacked / top only | encoder fwd+bwd | step / (encoder fwd+bwd) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset, model, step in rows:
        one = loss_only(model, feats, lens, ys, model.exits[-1:], device, args.warmup, args.repeats)
        every = loss_only(model, feats, lens, ys, model.exits, device, args.warmup, args.repeats)
        looped = loss_only(model, feats, lens, ys, model.exits, device, args.warmup, args.repeats, stacked=False)

        def enc_fwd_bwd() -> Dict[str, float]:
            t0 = sync(device)
            x, x_lens = model.encoder_embed(model.normalize(feats), lens)
            outs = model.encoder(x, x_lens)
            sum(o.float().pow(2).mean() for o, _ in outs).backward()
            model.zero_grad(set_to_none=True)
            return {"t": sync(device) - t0}

        enc = median_parts(enc_fwd_bwd, args.warmup, args.repeats)["t"]
        print(f"| {preset} | {len(model.exits)} | {one:.3f} | {looped:.3f} | {every:.3f} | {every / one:.2f} | {enc:.3f} | "
              f"{step / enc:.2f} |")
    for preset, model, _ in rows:
        if preset == args.breakdown:
            loss_breakdown(model, feats, lens, ys, device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
