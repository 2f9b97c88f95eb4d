"""What to look at when training diverges: per-module parameter, gradient and output
statistics (``--print-diagnostics``) and a first-non-finite detector (``--inf-check``)."""
import logging
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from torch import nn, Tensor


def _stats(t: Tensor) -> Tuple[float, float]:
    t = t.detach().float()
    return float(t.pow(2).mean().sqrt()), float(t.abs().max()) if t.numel() else 0.0


class ModuleDiagnostics:
    """Accumulates, over a few training steps, RMS and abs-max per module of:
    its own parameters, their gradients, and its output activations."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # name -> kind -> list of (rms, absmax), one per observed step
        self.stats: Dict[str, Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_hook(self._output_hook(name or "<model>")))

    def _output_hook(self, name: str):
        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                out = out[0]
            if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
                self.stats[name]["output"].append(_stats(out))
        return hook

    def after_backward(self) -> None:
        """Call after ``backward()`` (before ``optimizer.step``)."""
        for name, mod in self.model.named_modules():
            own = list(mod.parameters(recurse=False))
            if not own:
                continue
            name = name or "<model>"
            vec = torch.cat([p.detach().flatten().float() for p in own])
            self.stats[name]["param"].append(_stats(vec))
            grads = [p.grad.detach().flatten().float() for p in own if p.grad is not None]
            if grads:
                self.stats[name]["grad"].append(_stats(torch.cat(grads)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def report(self) -> str:
        lines = [f"{'module':60s} {'kind':6s} {'rms':>10s} {'abs-max':>10s}  (mean rms / max abs-max over steps)"]
        for name in sorted(self.stats):
            for kind in ("param", "grad", "output"):
                vals = self.stats[name].get(kind)
                if not vals:
                    continue
                rms = sum(v[0] for v in vals) / len(vals)
                amax = max(v[1] for v in vals)
                lines.append(f"{name[:60]:60s} {kind:6s} {rms:10.4g} {amax:10.4g}")
        return "\n".join(lines)


def register_inf_check(model: nn.Module) -> None:
    """Raise at the first module whose output or output gradient is not finite."""

    def check(name: str, what: str, t) -> None:
        if isinstance(t, tuple):
            for i, x in enumerate(t):
                check(f"{name}[{i}]", what, x)
        elif isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"--inf-check: non-finite {what} in module {name}")

    for name, mod in model.named_modules():
        name = name or "<model>"
        mod.register_forward_hook(lambda m, i, o, n=name: check(n, "output", o))
        mod.register_full_backward_hook(lambda m, gi, go, n=name: check(n, "output gradient", go))
    logging.info("--inf-check: hooks on %d modules", sum(1 for _ in model.modules()))
