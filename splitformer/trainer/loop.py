"""The training loop: one process's view of a (possibly distributed) run."""
import contextlib
import copy
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from splitformer.trainer import parts
from splitformer.trainer.arguments import model_args_dict, plain
from splitformer.trainer.diagnostics import ModuleDiagnostics, register_inf_check
from splitformer.trainer.distributed import DistContext, any_true, gather
from splitformer.trainer.guards import (BadBatchGuard, TrainingError, batch_info, check_max_duration,
                                        grads_finite, is_oom)
from splitformer.data.datamodule import input_lens
from splitformer.trainer.objective import Metrics, combine_losses, encoder_frames, fbank_frames, warmup_scales
from splitformer.trainer.state import load_resume_checkpoint, restore_model



def fix_random_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """--freeze-backbone-steps: a pretrained backbone runs without gradients while ``frozen``."""
    for m in model.modules():
        if hasattr(m, "backbone_frozen"):
            m.backbone_frozen = frozen


def set_batch_count(model: nn.Module, count: float) -> None:
    """Zipformer modules schedule dropout/balancers on ``batch_count``; keep it in step."""
    for m in model.modules():
        if hasattr(m, "batch_count"):
            m.batch_count = count


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DDP) else model


class Trainer:
    def __init__(self, args, ctx: DistContext) -> None:
        self.args, self.ctx, self.device = args, ctx, ctx.device
        if args.use_fp16 and self.device.type != "cuda":
            raise TrainingError("--use-fp16 needs a CUDA device (GradScaler); on CPU use --use-bf16 true")
        self.exp_dir = Path(args.exp_dir)
        fix_random_seed(args.seed)
        parts.set_rnnt_backend(args.rnnt_backend)

        self.tokenizer = parts.build_tokenizer(args)
        from splitformer.model.config import build_model, exit_loss_weights

        try:
            model = build_model(args, self.tokenizer.vocab_size)  # sets args.vocab_size
        except ValueError as e:  # flags that describe no model, a backbone that cannot be loaded
            raise TrainingError(str(e)) from e
        if args.debug_float64:  # for tests that compare runs to 1e-5 (float32 rounding noise gets amplified by Adam)
            model.double()
        self.dtype = next(model.parameters()).dtype
        args.input_kind = model.input_kind  # fbank, or audio samples for a waveform backbone
        self.dm = parts.build_datamodule(args)
        parts.set_feature_stats(model, self.dm)  # a resumed run then loads the saved ones over these
        self.model_args = model_args_dict(args)
        try:
            self.weights = exit_loss_weights(args, list(model.exits))
        except ValueError as e:
            raise TrainingError(str(e)) from e
        self.trained_exits = list(self.weights)
        self.exit_layers = None if len(self.trained_exits) == len(model.exits) else self.trained_exits
        self.num_params = sum(p.numel() for p in model.parameters())

        # The running average lives on rank 0, in float64 on the CPU (icefall's choice: no drift).
        self.model_avg = parts.make_average(model) if ctx.is_main else None
        model.to(self.device)
        self.model = model
        self.optimizer = parts.build_optimizer(model, args)
        self.scheduler = parts.build_scheduler(self.optimizer, args)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(args.use_fp16))
        self.guard = BadBatchGuard(args.max_bad_batches)
        self.batch_idx_train = 0
        self.start_epoch = args.start_epoch
        self.resume: Optional[Dict[str, Any]] = None  # mid-epoch state (sampler, rng)
        self.epoch_metrics = Metrics()
        self._load_resume()

        if args.inf_check:
            register_inf_check(model)
        self.train_model: nn.Module = model
        if ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(model, device_ids=ids, find_unused_parameters=bool(args.find_unused_parameters))
        if args.compile:
            # default dynamic=None: shapes become symbolic after the first recompile
            # (dynamic=True fails inside dynamo on the Zipformer with torch 2.13)
            self.train_model = torch.compile(self.train_model)

        cuts = parts.train_cuts(self.dm, self.tokenizer)
        check_max_duration(((c.id, float(c.duration)) for c in cuts), float(args.max_duration), "the training set")
        self.train_dl = parts.train_loader(self.dm, cuts, ctx.world_size, ctx.rank, args.seed)
        self.valid_dl = parts.valid_loader(self.dm)
        self.sampler = parts.sampler_of(self.train_dl)
        # Sampler state right after the last batch trained on (batches carry it: with DataLoader
        # workers the sampler itself runs ahead by the prefetched batches).
        self.sampler_state: Optional[Dict[str, Any]] = None
        self.tb = None
        if ctx.is_main and args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.exp_dir / "tensorboard"))

    # ------------------------------------------------------------------ resume
    def _load_resume(self) -> None:
        ckpt, path = load_resume_checkpoint(self.args)
        if ckpt is None:
            return
        restore_model(self.model, ckpt, path, self.model_args)
        if self.model_avg is not None and ckpt.get("model_avg") is not None:
            restore_model(self.model_avg, ckpt, path, None, key="model_avg")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("grad_scaler"):
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise parts.checkpoint_error()(f"{path}: cannot restore the optimizer/scheduler state: {e}") from e
        self.batch_idx_train = int(ckpt["batch_idx_train"])
        self.guard.count = int(ckpt.get("bad_batches", 0))
        if self.args.start_batch > 0:
            self.start_epoch = int(ckpt["epoch"])
            self.resume = ckpt
            self.epoch_metrics.add(ckpt.get("epoch_metrics", {}))
        else:
            self.start_epoch = int(ckpt["epoch"]) + 1
        logging.info("resumed from %s: epoch %d, batch %d", path, self.start_epoch, self.batch_idx_train)

    # ------------------------------------------------------------------ state
    def state(self, epoch: int, batch_idx_epoch: int, rng: Any) -> Dict[str, Any]:
        return dict(
            model=unwrap(self.model).state_dict(),
            model_avg=self.model_avg.state_dict() if self.model_avg is not None else None,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            sampler=self.sampler_state if self.sampler_state is not None else self.sampler.state_dict(),
            grad_scaler=self.scaler.state_dict(),
            rng=rng,
            args=self.model_args,
            train_args=plain(vars(self.args)),
            epoch=epoch,
            batch_idx_train=self.batch_idx_train,
            batch_idx_epoch=batch_idx_epoch,
            bad_batches=self.guard.count,
            epoch_metrics=dict(self.epoch_metrics.sums),
        )

    def save(self, name: str, epoch: int, batch_idx_epoch: int) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        rng = gather(self.ctx, parts.get_rng_state())
        if not self.ctx.is_main:
            return
        path = self.exp_dir / name
        parts.save(path, **self.state(epoch, batch_idx_epoch, rng))
        logging.info("saved %s", path)

    # ------------------------------------------------------------------ loss
    def autocast(self):
        if self.args.use_fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        if self.args.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_loss(self, model: nn.Module, batch: Dict[str, Any], exits: List[int],
                     weights: Dict[int, float], final_scales: bool = False, outputs: Optional[list] = None):
        """Loss of a batch; ``final_scales`` uses the loss weights of after the warm-up (validation),
        so that losses of different epochs are comparable. ``outputs``: a list that receives the encoder's
        exit outputs (validation decodes them too)."""
        feats = batch["inputs"].to(self.device, dtype=self.dtype, non_blocking=True)
        sup = batch["supervisions"]
        feat_lens = input_lens(sup).to(self.device)
        y = self.tokenizer.encode(list(sup["text"]))
        with self.autocast():
            out = model(feats, feat_lens, y, prune_range=self.args.prune_range, am_scale=self.args.am_scale,
                        lm_scale=self.args.lm_scale, exit_layers=self.exit_layers, exit_outputs=outputs)
        step = self.args.warm_step if final_scales else self.batch_idx_train
        s_simple, s_pruned = warmup_scales(step, self.args.warm_step, self.args.simple_loss_scale)
        loss, info = combine_losses(out, weights, s_simple, s_pruned, self.args.ctc_loss_scale)
        info["frames"] = encoder_frames(fbank_frames(sup))
        info["utterances"] = len(sup["text"])
        return loss, info

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Dict[str, Any], diag: Optional[ModuleDiagnostics] = None) -> Optional[Dict[str, float]]:
        """Forward, backward and update; returns the batch's loss parts, or None if skipped."""
        a, ctx = self.args, self.ctx
        binfo = batch_info(batch)
        loss, info, oom = None, None, False
        # Buffers (BatchNorm statistics, counters) change in the forward pass; a skipped batch
        # must not leave NaNs or its statistics in them.
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            loss, info = self.compute_loss(self.train_model, batch, self.trained_exits, self.weights)
            if self.batch_idx_train in a.debug_nan_batches:
                loss = loss * float("nan")
            if self.batch_idx_train in a.debug_oom_batches:
                raise torch.OutOfMemoryError("CUDA out of memory (injected by --debug-oom-batches)")
        except Exception as e:  # noqa: BLE001 -- only OOM is handled, the rest re-raised
            if not is_oom(e):
                raise
            oom, loss = True, None
        bad_loss = (not oom) and not bool(torch.isfinite(loss.detach()))
        any_oom, any_bad_loss = any_true(ctx, oom, bad_loss)
        if any_oom:
            self._restore(buffers)
            self._skip_oom(binfo)
            return None
        try:
            # The loss is a sum over utterances and DDP averages gradients over ranks: scaling by
            # the world size makes the gradient that of the summed loss of the global batch.
            self.scaler.scale(loss * ctx.world_size).backward()
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            if ctx.distributed:
                raise TrainingError(f"out of memory in backward on rank {ctx.rank} ({binfo.describe()}); "
                                    f"ranks cannot be resynchronised: lower --max-duration") from e
            self._restore(buffers)
            self._skip_oom(binfo)
            return None
        if diag is not None:
            diag.after_backward()
        if any_bad_loss or (not a.use_fp16 and not grads_finite(self.model.parameters())):
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(buffers)
            ids = [i for r in gather(ctx, binfo.cut_ids) for i in r]
            reason = "non-finite loss" if any_bad_loss else "non-finite gradient"
            self.guard.record(self.batch_idx_train, reason, ids)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return info

    @staticmethod
    @torch.no_grad()
    def _restore(buffers) -> None:
        for b, saved in buffers:
            b.copy_(saved)

    def _skip_oom(self, binfo) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        infos = gather(self.ctx, binfo.describe())
        logging.warning("batch %d: out of memory, skipped. %s", self.batch_idx_train,
                        " | ".join(f"rank {r}: {d}" for r, d in enumerate(infos)))

    # ------------------------------------------------------------------ epochs
    def fit(self) -> None:
        a = self.args
        logging.info("training %s (%d parameters), exits %s trained with weights %s, on %s x%d",
                     getattr(a, "preset", "?"), self.num_params, self.trained_exits, self.weights,
                     self.device, self.ctx.world_size)
        if a.print_diagnostics:
            self.run_diagnostics()
            return
        for epoch in range(self.start_epoch, a.num_epochs + 1):
            self.run_epoch(epoch)
        if self.tb is not None:
            self.tb.close()

    def _epoch_iterator(self, epoch: int):
        fix_random_seed(self.args.seed + epoch - 1)
        self.scheduler.step_epoch(epoch - 1)
        self.sampler.set_epoch(epoch - 1)
        resume = self.resume
        if resume is not None:
            self.sampler.load_state_dict(copy.deepcopy(resume["sampler"]))
            if "splitformer_batch_index" not in resume["sampler"]:  # a checkpoint from before per-batch seeds
                self.sampler.batch_index = int(resume.get("batch_idx_epoch", 0))
        it = iter(self.train_dl)  # draws a base seed from torch's RNG: restore after it
        batch_idx_epoch = 0
        if resume is not None:
            rng = resume["rng"]
            parts.set_rng_state(rng[self.ctx.rank] if len(rng) == self.ctx.world_size else rng[0])
            batch_idx_epoch = int(resume.get("batch_idx_epoch", 0))
            self.resume = None
        else:
            self.epoch_metrics = Metrics()
        return it, batch_idx_epoch

    def run_epoch(self, epoch: int) -> None:
        a, ctx = self.args, self.ctx
        self.set_train_mode()
        it, batch_idx_epoch = self._epoch_iterator(epoch)
        t0 = time.time()
        utts0 = self.epoch_metrics.sums.get("utterances", 0.0)
        bar = None
        if ctx.is_main and a.progress_bar:
            from tqdm import tqdm

            bar = tqdm(desc=f"epoch {epoch}", initial=batch_idx_epoch, unit="batch", mininterval=1.0,
                       dynamic_ncols=True)
        dump = None
        if a.debug_dump_batches is not None:
            dump = open(f"{a.debug_dump_batches}.rank{ctx.rank}", "a")
        for batch in it:
            batch_idx_epoch += 1
            self.batch_idx_train += 1
            set_batch_count(self.model, self.batch_idx_train * a.max_duration * ctx.world_size / a.schedule_ref_duration)
            if 0 < a.freeze_backbone_steps and self.batch_idx_train <= a.freeze_backbone_steps + 1:
                # a module walk only while frozen and on the step that unfreezes, not on every batch of the run
                set_backbone_frozen(self.model, self.batch_idx_train <= a.freeze_backbone_steps)
            if dump is not None:
                dump.write(f"{epoch}\t{self.batch_idx_train}\t{' '.join(batch_info(batch).cut_ids)}\n")
            self.sampler_state = batch.pop("sampler_state", None)
            info = self.train_step(batch)
            self.scheduler.step_batch(self.batch_idx_train)
            if info is not None:
                self.epoch_metrics.add(info)
            self._maybe_fp16_scale()
            if self.model_avg is not None and self.batch_idx_train % a.average_period == 0:
                parts.update_average(self.model, self.model_avg, self.batch_idx_train, a.average_period)
            lr = self.current_lr()
            if bar is not None:
                utt_s = (self.epoch_metrics.sums.get("utterances", 0.0) - utts0) / max(time.time() - t0, 1e-9)
                loss = info["loss"] / max(info["frames"], 1) if info else float("nan")
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", utt_s=f"{utt_s:.1f}", refresh=False)
                bar.update(1)
            if info is not None and self.batch_idx_train % a.log_interval == 0:
                self._log_train(epoch, batch_idx_epoch, info, lr)
            if a.save_every_n > 0 and self.batch_idx_train % a.save_every_n == 0:
                self.save(f"checkpoint-{self.batch_idx_train}.pt", epoch, batch_idx_epoch)
                if ctx.is_main:
                    parts.remove_old_checkpoints(self.exp_dir, a.keep_last_k)
            if a.debug_kill_after_batch and self.batch_idx_train == a.debug_kill_after_batch:
                logging.warning("--debug-kill-after-batch %d: SIGKILL", self.batch_idx_train)
                os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            bar.close()
        if dump is not None:
            dump.close()
        train_time = time.time() - t0
        train = self.epoch_metrics.all_reduce(self.device)
        valid, valid_wer = self.validate()
        self.save(f"epoch-{epoch}.pt", epoch, batch_idx_epoch)
        if a.debug_dump_batches is not None:
            torch.save(unwrap(self.model).state_dict(), f"{a.debug_dump_batches}.rank{ctx.rank}.pt")
        if ctx.is_main:
            self._log_epoch(epoch, train, valid, valid_wer, train_time)

    def set_train_mode(self) -> None:
        # --debug-eval-mode (tests only): a deterministic forward (no dropout, layer skipping or
        # BatchNorm batch statistics), so that differently batched runs can be compared exactly.
        self.train_model.train(not self.args.debug_eval_mode)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _maybe_fp16_scale(self) -> None:
        """icefall's guard: GradScaler only lowers its scale quickly; nudge it back up, and stop
        if it collapses (the model produces inf/NaN whatever the scale)."""
        if not self.args.use_fp16 or self.batch_idx_train % 100 != 0:
            return
        scale = self.scaler.get_scale()
        if scale < 8.0 or (scale < 32.0 and self.batch_idx_train % 400 == 0):
            self.scaler.update(scale * 2.0)
        if scale < 0.01:
            logging.warning("grad scale is small: %g", scale)
        if scale < 1e-5:
            raise TrainingError(f"grad scale {scale:g} collapsed at batch {self.batch_idx_train}: the model "
                                f"diverges in fp16; try --use-bf16 or a lower --base-lr")

    @torch.no_grad()
    def validate(self) -> Tuple[Metrics, Dict[int, float]]:
        """Dev losses (with the final loss weights) and, with --valid-wer, greedy dev WER at every exit.

        The WER (exit layer -> %) is computed on rank 0 only; other ranks get an empty dict."""
        from splitformer.decoding.results import word_error_rate
        from splitformer.decoding.runner import greedy_exit_words

        model = unwrap(self.model)
        model.eval()
        tot = Metrics()
        # greedy WER at every trained exit (what tells a blank plateau from learning), on rank 0, read from the
        # encoder outputs of the loss pass
        want_wer = self.args.valid_wer and self.ctx.is_main
        results: Dict[int, list] = {e: [] for e in self.trained_exits}
        for batch in self.valid_dl:
            outs: list = []
            _, info = self.compute_loss(model, batch, self.trained_exits, self.weights, final_scales=True,
                                        outputs=outs if want_wer else None)
            tot.add(info)
            if want_wer:
                sup = batch["supervisions"]
                refs = [t.split() for t in sup["text"]]
                ids = [c.id for c in sup["cut"]]
                for e, words in greedy_exit_words(model, outs, self.tokenizer).items():
                    if e in results:
                        results[e].extend(zip(ids, refs, words))
        self.set_train_mode()
        wer = {e: word_error_rate(r)[0] for e, r in results.items()} if want_wer else {}
        return tot.all_reduce(self.device), wer

    # ------------------------------------------------------------------ logging
    def _log_train(self, epoch: int, batch_idx_epoch: int, info: Dict[str, float], lr: float) -> None:
        if not self.ctx.is_main:
            return
        cur = Metrics()
        cur.add(info)
        logging.info("epoch %d, batch %d (global %d), lr %.3g: batch %s; epoch so far %s", epoch,
                     batch_idx_epoch, self.batch_idx_train, lr, cur.summary(self._main_keys()),
                     self.epoch_metrics.summary(["loss"]))
        if self.tb is not None:
            for k, v in cur.per_frame().items():
                self.tb.add_scalar(f"train/{k}", v, self.batch_idx_train)
            self.tb.add_scalar("train/lr", lr, self.batch_idx_train)
            if self.args.use_fp16:
                self.tb.add_scalar("train/grad_scale", self.scaler.get_scale(), self.batch_idx_train)

    def _main_keys(self) -> List[str]:
        return ["loss"] + [f"exit{e}/loss" for e in self.trained_exits]

    def _log_epoch(self, epoch: int, train: Metrics, valid: Metrics, wer: Dict[int, float], train_time: float) -> None:
        utt_s = train.sums.get("utterances", 0.0) / max(train_time, 1e-9)
        tr, va = train.per_frame(), valid.per_frame()
        exits = " ".join(f"exit{e}={va.get(f'exit{e}/loss', math.nan):.4f}" for e in self.trained_exits)
        wers = (", valid WER " + " ".join(f"exit{e}={w:.1f}%" for e, w in sorted(wer.items()))) if wer else ""
        line = (f"epoch {epoch}: train loss {tr.get('loss', math.nan):.4f}, valid loss {va.get('loss', math.nan):.4f} "
                f"(per exit: {exits}){wers}, lr {self.current_lr():.3g}, {train_time:.1f} s, {utt_s:.1f} utt/s, "
                f"bad batches {self.guard.count}, batch_idx_train {self.batch_idx_train}")
        logging.info(line)
        with open(self.exp_dir / "log" / "epochs.txt", "a") as f:
            f.write(line + "\n")
        if self.tb is not None:
            for k, v in va.items():
                self.tb.add_scalar(f"valid/{k}", v, self.batch_idx_train)
            for e, w in wer.items():
                self.tb.add_scalar(f"valid/exit{e}/wer", w, self.batch_idx_train)
            self.tb.add_scalar("train/epoch_loss", tr.get("loss", math.nan), self.batch_idx_train)
            self.tb.add_scalar("train/utt_per_s", utt_s, self.batch_idx_train)
            self.tb.flush()

    # ------------------------------------------------------------------ diagnostics
    def run_diagnostics(self) -> None:
        diag = ModuleDiagnostics(unwrap(self.model))
        it, _ = self._epoch_iterator(self.start_epoch)
        n = 0
        for batch in it:
            self.batch_idx_train += 1
            self.train_step(batch, diag)
            n += 1
            if n >= self.args.diagnostics_batches:
                break
        diag.remove()
        if self.ctx.is_main:
            text = diag.report()
            (self.exp_dir / "diagnostics.txt").write_text(text + "\n")
            logging.info("diagnostics over %d batches (also in %s):\n%s", n, self.exp_dir / "diagnostics.txt", text)
