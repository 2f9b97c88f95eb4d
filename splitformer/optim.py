"""ScaledAdam optimizer and Eden learning-rate schedule (the Zipformer recipe).

ScaledAdam is Adam made aware of each parameter tensor's scale:

* the step of a non-scalar tensor is ``lr * param_rms * (normalized grad)``, so a tensor
  with RMS 0.1 moves ten times less than one with RMS 1.0 -- relative change, not absolute;
* the scale (RMS) of each tensor is learned separately, as if the tensor were factored as
  ``direction * exp(log_scale)``; the scale is not learned below ``param_min_rms`` and is
  pushed down when the RMS exceeds ``param_max_rms``;
* scalars use plain Adam with ``scalar_lr_scale * lr`` and are clamped to ``+-scalar_max``;
* the whole gradient is clipped at ``clipping_scale`` times the median gradient norm of
  recent steps, so a single bad batch cannot blow up the second-moment statistics.

Parameters of the same shape are stacked and updated together, which keeps the number of
kernel launches per step proportional to the number of distinct shapes, not of tensors.
"""
import argparse
import logging
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

# Steps (before the first full ``clipping_update_period``) at which a provisional clipping
# threshold is estimated from the norms seen so far; it is doubled because the gradient
# norm still moves fast early in training.
_EARLY_THRESHOLD_STEPS = (10, 20, 40)


def _split_named(params) -> Tuple[List[dict], List[List[str]]]:
    """Accept parameters, (name, parameter) pairs, or groups of either (``params`` or
    ``named_params`` keys); return plain torch param groups and the names per group."""
    items = list(params)
    if not items:
        raise ValueError("ScaledAdam got an empty parameter list")
    groups: List[dict] = []
    names: List[List[str]] = []
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    for i, group in enumerate(items):
        group = dict(group)
        if "named_params" in group:
            pairs = list(group.pop("named_params"))
            group["params"] = [p for _, p in pairs]
            names.append([n for n, _ in pairs])
        else:
            plist = []
            nlist = []
            for j, x in enumerate(group["params"]):
                if isinstance(x, tuple):
                    nlist.append(x[0])
                    plist.append(x[1])
                else:
                    nlist.append(f"group{i}.param{j}")
                    plist.append(x)
            group["params"] = plist
            names.append(nlist)
        groups.append(group)
    return groups, names


def _rms(x: Tensor) -> Tensor:
    """RMS over all but the leading (stack) dimension, kept broadcastable."""
    flat = x.reshape(x.shape[0], -1)
    norm = torch.linalg.vector_norm(flat, dim=1) * (1.0 / math.sqrt(flat.shape[1]))
    return norm.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product of two stacked tensors, shape (N,), without an (N, M) temporary."""
    n = a.shape[0]
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).reshape(n)


class ScaledAdam(Optimizer):
    """Adam whose updates are proportional to each parameter tensor's RMS.

    Args:
      params: parameters, ``named_parameters()`` pairs (so that clipping messages can name the
        parameter dominating the gradient norm), or a list of groups with ``params`` or
        ``named_params``.
      lr: learning rate; the step of a non-scalar tensor is about ``lr * rms(param)`` per
        element, so values around 0.045 (much larger than for Adam) are normal.
      clipping_scale: clip the gradient to this multiple of the median recent gradient norm
        (None disables clipping).
      betas: momentum and second-moment decay.
      scalar_lr_scale: lr factor for scalar tensors and for learning the tensors' scales.
      eps: added to the RMS of the gradient.
      param_min_rms, param_max_rms: bounds on a tensor's RMS: below the minimum its scale stops
        shrinking (and steps are sized as if the RMS were the minimum); above the maximum
        its scale is pushed down.
      scalar_max: scalar parameters are clamped to ``[-scalar_max, scalar_max]``.
      size_update_period: the scale is learned every this many steps (cheaper, less noisy).
      clipping_update_period: the clipping threshold is re-estimated every this many steps.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-02,
        clipping_scale: Optional[float] = 2.0,
        betas: Tuple[float, float] = (0.9, 0.98),
        scalar_lr_scale: float = 0.1,
        eps: float = 1.0e-08,
        param_min_rms: float = 1.0e-05,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_update_period: int = 100,
        show_dominant_parameters: bool = True,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 < betas[1] < 1.0:
            raise ValueError(f"ScaledAdam: betas must be in [0, 1), got {betas}")
        if clipping_scale is not None and clipping_scale <= 0:
            raise ValueError(f"ScaledAdam: clipping_scale must be > 0 or None, got {clipping_scale}")
        defaults = dict(
            lr=lr,
            clipping_scale=clipping_scale,
            betas=tuple(betas),
            scalar_lr_scale=scalar_lr_scale,
            eps=eps,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            size_update_period=size_update_period,
            clipping_update_period=clipping_update_period,
        )
        groups, names = _split_named(params)
        super().__init__(groups, defaults)
        self.param_names = names
        self.show_dominant_parameters = show_dominant_parameters
        # Clipping factor applied at the last step, per group (1.0 = not clipped).
        self.last_clip_factors: List[float] = [1.0] * len(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        names = getattr(self, "param_names", None)
        if names is not None and len(names) < len(self.param_groups):
            n = len(self.param_groups) - 1
            names.append([f"group{n}.param{j}" for j in range(len(param_group["params"]))])
            self.last_clip_factors.append(1.0)

    # ----------------------------------------------------------------- batching
    @staticmethod
    def _batches(group: dict, names: List[str]) -> List[Tuple[List[Tensor], List[str]]]:
        """Parameters of one group bucketed by (device, dtype, shape), in a fixed order
        (first appearance), so that the state layout is the same on every run."""
        buckets: "OrderedDict[tuple, Tuple[List[Tensor], List[str]]]" = OrderedDict()
        for p, n in zip(group["params"], names):
            key = (str(p.device), str(p.dtype), tuple(p.shape))
            buckets.setdefault(key, ([], []))
            buckets[key][0].append(p)
            buckets[key][1].append(n)
        return list(buckets.values())

    @staticmethod
    def _stack(plist: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Stacked values and gradients (zeros where a parameter got none). A lone tensor is
        viewed, not copied, so it is updated in place."""
        if len(plist) == 1:
            p = plist[0]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            return p.detach().unsqueeze(0), g.unsqueeze(0)
        P = torch.stack([p.detach() for p in plist])
        G = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in plist])
        return P, G

    def _init_state(self, group: dict, P: Tensor, state: dict) -> None:
        state["step"] = 0
        state["delta"] = torch.zeros_like(P)
        state["exp_avg_sq"] = torch.zeros_like(P)
        if P[0].numel() > 1:
            rms = _rms(P)
            state["param_rms"] = rms
            state["scale_exp_avg_sq"] = torch.zeros_like(rms)
            state["scale_grads"] = torch.zeros(
                group["size_update_period"], *rms.shape, dtype=P.dtype, device=P.device
            )

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, (group, names) in enumerate(zip(self.param_groups, self.param_names)):
            if all(p.grad is None for p in group["params"]):
                # a group no loss reached this step (a backbone under --freeze-backbone-steps): leave it alone, so
                # that its clipping history holds no zero norms and its step count (Adam's bias correction) waits
                continue
            batches = []
            for plist, nlist in self._batches(group, names):
                if any(p.grad is not None and p.grad.is_sparse for p in plist):
                    raise RuntimeError("ScaledAdam does not support sparse gradients")
                P, G = self._stack(plist)
                state = self.state[plist[0]]
                if len(state) == 0:
                    self._init_state(group, P, state)
                batches.append((plist, nlist, P, G, state))
            factor = self._clip_factor(group, batches)
            self.last_clip_factors[gi] = factor
            for plist, _, P, G, state in batches:
                if factor != 1.0:
                    G = G * factor
                if P[0].numel() == 1:
                    self._step_scalar(group, P, G, state)
                else:
                    self._step_tensor(group, P, G, state)
                state["step"] += 1
                if len(plist) > 1:
                    torch._foreach_copy_(plist, list(P.unbind(0)))
        return loss

    def _step_tensor(self, group: dict, P: Tensor, G: Tensor, state: dict) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        period = group["size_update_period"]
        step = state["step"]
        delta = state["delta"]
        delta.mul_(beta1)

        # Learn the scale: d(loss)/d(log_scale) = sum(param * grad), accumulated over a period.
        scale_grads = state["scale_grads"]
        scale_grads[step % period] = _row_dot(P, G).reshape(scale_grads.shape[1:])
        if step % period == period - 1:
            state["param_rms"].copy_(_rms(P))
            if step > 0:
                self._size_update(group, P, scale_grads, state)

        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(G, G, value=1 - beta2)
        # grad / (sqrt(v / bc2) + eps) == sqrt(bc2) * grad / (sqrt(v) + eps * sqrt(bc2))
        sqrt_bc2 = math.sqrt(1 - beta2 ** (step + 1))
        denom = exp_avg_sq.sqrt().add_(group["eps"] * sqrt_bc2)
        scale = state["param_rms"].clamp(min=group["param_min_rms"]) * (-lr * (1 - beta1) * sqrt_bc2)
        delta.addcdiv_(G, denom.div_(scale))
        P.add_(delta)

    def _size_update(self, group: dict, P: Tensor, scale_grads: Tensor, state: dict) -> None:
        """Adam on the log-scale of each tensor, using the gradients of the last period."""
        beta1, beta2 = group["betas"]
        period = scale_grads.shape[0]
        size_lr = group["lr"] * group["scalar_lr_scale"]
        beta2_period = beta2**period
        sq = state["scale_exp_avg_sq"]
        sq.mul_(beta2_period).add_((scale_grads**2).mean(dim=0), alpha=1 - beta2_period)
        n_updates = (state["step"] + 1) // period
        bias_corr2 = 1 - beta2_period**n_updates
        denom = sq.sqrt() + group["eps"]
        scale_step = scale_grads.sum(dim=0) / denom * (-size_lr * math.sqrt(bias_corr2))
        rms = state["param_rms"]
        # Too small: stop shrinking it. Too large: shrink it at the maximum rate.
        scale_step.masked_fill_(rms < group["param_min_rms"], 0.0)
        scale_step.masked_fill_(rms > group["param_max_rms"], -size_lr * period)
        state["delta"].add_(P * scale_step, alpha=1 - beta1)

    def _step_scalar(self, group: dict, P: Tensor, G: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["scalar_lr_scale"]
        delta = state["delta"]
        delta.mul_(beta1)
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(G, G, value=1 - beta2)
        bias_corr2 = 1 - beta2 ** (state["step"] + 1)
        denom = (exp_avg_sq / bias_corr2).sqrt() + group["eps"]
        delta.addcdiv_(G, denom, value=-lr * (1 - beta1))
        P.clamp_(min=-group["scalar_max"], max=group["scalar_max"])
        P.add_(delta)

    # ----------------------------------------------------------------- clipping
    def _clip_factor(self, group: dict, batches: list) -> float:
        """Factor (<= 1) to scale this step's gradient by. The norm is measured in the
        optimizer's own metric: grad * param_rms for tensors, grad * scalar_lr_scale for
        scalars, i.e. roughly the size of the change the gradient asks for."""
        clipping_scale = group["clipping_scale"]
        first = batches[0][4]
        step = first["step"]
        if clipping_scale is None or step == 0:
            return 1.0
        period = group["clipping_update_period"]
        sumsqs = self._sumsqs(group, batches)
        tot_norm = torch.stack([s.sum() for s in sumsqs]).sum().sqrt()
        if "clip_norms" not in first:
            first["clip_norms"] = torch.zeros(period, device=tot_norm.device)
            first["clip_num_clipped"] = 0
            first["clip_num_seen"] = 0
        norms = first["clip_norms"]
        norms[step % period] = tot_norm
        first["clip_num_seen"] += 1

        early = step in _EARLY_THRESHOLD_STEPS and step < period
        if step % period == 0 or early:
            recent = norms[1 : step + 1] if step < period else norms
            quartiles = torch.quantile(recent.float().cpu(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
            median = quartiles[2].item()
            if not math.isfinite(median):
                raise RuntimeError(
                    f"ScaledAdam: the median gradient norm of the last {recent.numel()} steps is "
                    f"{median}: too many non-finite gradients; lower the learning rate or check the loss"
                )
            threshold = clipping_scale * median * (2.0 if early else 1.0)
            pct = 100.0 * first["clip_num_clipped"] / max(1, first["clip_num_seen"])
            logging.info(
                "ScaledAdam: clipping_scale=%s, grad-norm quartiles %s, threshold=%.3e, percent-clipped=%.1f",
                clipping_scale,
                " ".join("%.3e" % q for q in quartiles.tolist()),
                threshold,
                pct,
            )
            first["clip_threshold"] = threshold
            first["clip_num_clipped"] = 0
            first["clip_num_seen"] = 0

        threshold = first.get("clip_threshold")
        if threshold is None:
            return 1.0  # no estimate yet
        norm = tot_norm.item()
        factor = min(1.0, threshold / (norm + 1.0e-20)) if math.isfinite(norm) else 0.0
        if factor < 1.0:
            first["clip_num_clipped"] += 1
            dominant = ""
            if self.show_dominant_parameters and factor < 0.5:
                dominant = "; " + self._dominant(batches, sumsqs, tot_norm)
            logging.log(
                logging.WARNING if factor < 0.5 else logging.INFO,
                "ScaledAdam: scaling gradients by %.3e (grad norm %.3e > threshold %.3e)%s",
                factor,
                norm,
                threshold,
                dominant,
            )
        if factor == 0.0:
            for _, _, _, G, _ in batches:
                G.zero_()  # drop inf/nan so they do not poison the statistics
        return factor

    @staticmethod
    def _sumsqs(group: dict, batches: list) -> List[Tensor]:
        """Per-batch, per-parameter squared norms of the scaled gradient, shape (N,)."""
        out = []
        s2 = group["scalar_lr_scale"] ** 2
        for _, _, P, G, state in batches:
            sq = torch.linalg.vector_norm(G.reshape(G.shape[0], -1), dim=1) ** 2
            if P[0].numel() == 1:
                out.append(sq * s2)
            else:
                out.append(sq * state["param_rms"].reshape(-1) ** 2)
        return out

    @staticmethod
    def _dominant(batches: list, sumsqs: List[Tensor], tot_norm: Tensor) -> str:
        """Names the parameters contributing most to the (scaled) gradient norm."""
        tot = tot_norm.item() ** 2 + 1e-30
        contrib = []
        for (_, nlist, _, _, _), s in zip(batches, sumsqs):
            contrib.extend(zip(s.tolist(), nlist))
        contrib.sort(reverse=True)
        return "dominant parameters: " + ", ".join(f"{n} ({100.0 * v / tot:.1f}%)" for v, n in contrib[:3])


class Eden:
    """Eden learning-rate schedule: decays with both batch count and (fractional) epoch,

        lr = base_lr * ((batch^2 + lr_batches^2) / lr_batches^2) ** -0.25
                     * ((epoch^2 + lr_epochs^2) / lr_epochs^2) ** -0.25 * warmup,

    where ``warmup`` rises linearly from ``warmup_start`` to 1 over ``warmup_batches``.
    Call ``step_batch(batch_idx_train)`` after every optimizer step and
    ``step_epoch(epoch - 1)`` at the start of each (1-based) epoch, as icefall does.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_batches: Union[int, float],
        lr_epochs: Union[int, float],
        warmup_batches: Union[int, float] = 500.0,
        warmup_start: float = 0.5,
    ):
        if lr_batches <= 0 or lr_epochs <= 0:
            raise ValueError(f"Eden: lr_batches and lr_epochs must be > 0, got {lr_batches}, {lr_epochs}")
        if not 0.0 <= warmup_start <= 1.0:
            raise ValueError(f"Eden: warmup_start must be in [0, 1], got {warmup_start}")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.base_lrs = [group["base_lr"] for group in optimizer.param_groups]
        self.lr_batches = float(lr_batches)
        self.lr_epochs = float(lr_epochs)
        self.warmup_batches = float(warmup_batches)
        self.warmup_start = float(warmup_start)
        self.batch = 0
        self.epoch = 0
        self._last_lr = self._apply()

    def factor(self, batch: Optional[float] = None, epoch: Optional[float] = None) -> float:
        """The multiplier on base_lr at (batch, epoch) (defaults: the current position)."""
        b = self.batch if batch is None else batch
        e = self.epoch if epoch is None else epoch
        f = ((b**2 + self.lr_batches**2) / self.lr_batches**2) ** -0.25
        f *= ((e**2 + self.lr_epochs**2) / self.lr_epochs**2) ** -0.25
        if self.warmup_batches > 0 and b < self.warmup_batches:
            f *= self.warmup_start + (1.0 - self.warmup_start) * (b / self.warmup_batches)
        return f

    def _apply(self) -> List[float]:
        f = self.factor()
        lrs = [base * f for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs

    def step_batch(self, batch: Optional[int] = None) -> None:
        """Set the batch count (or advance it by one) and update the optimizer's lr."""
        self.batch = self.batch + 1 if batch is None else batch
        self._last_lr = self._apply()

    def step_epoch(self, epoch: Optional[Union[int, float]] = None) -> None:
        """Set the epoch (or advance it by one) and update the optimizer's lr."""
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self._last_lr = self._apply()

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def state_dict(self) -> Dict[str, object]:
        """Plain numbers only, so that it is loadable with torch.load(weights_only=True)."""
        return {
            "base_lrs": list(self.base_lrs),
            "lr_batches": self.lr_batches,
            "lr_epochs": self.lr_epochs,
            "warmup_batches": self.warmup_batches,
            "warmup_start": self.warmup_start,
            "batch": self.batch,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for key in ("base_lrs", "lr_batches", "lr_epochs", "warmup_batches", "warmup_start", "batch", "epoch"):
            if key in state:
                setattr(self, key, state[key])
        self.base_lrs = list(self.base_lrs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["base_lr"] = base
        self._last_lr = self._apply()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and schedule flags (icefall's names and Zipformer defaults)."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--base-lr", type=float, default=0.045, help="ScaledAdam base learning rate")
    group.add_argument(
        "--lr-batches",
        type=float,
        default=7500,
        help="Batch count at which Eden's batch factor has decayed by 2^-0.25; lower it for small data",
    )
    group.add_argument(
        "--lr-epochs",
        type=float,
        default=3.5,
        help="Epoch at which Eden's epoch factor has decayed by 2^-0.25",
    )
    group.add_argument(
        "--warmup-batches",
        type=float,
        default=500.0,
        help="Batches over which the lr rises linearly from half to full",
    )
