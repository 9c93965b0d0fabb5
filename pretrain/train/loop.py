"""The training loop, shared by pretraining and fine-tuning.

The step body is: batch, forward, loss, backward, step, log. Everything else happens at
step boundaries, where all ranks agree (one small all-reduce) on whether a stop was
requested or the loss went non-finite, so collective work (checkpoints, evaluation)
is always entered by every rank together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.runtime.collectives import all_reduce_flags, sum_counters
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.run_log import RunLog
from pretrain.zero.engine import input_dtype
from pretrain.zero.optimizer import OptimConfig
from vitscale_common.config_loader import ConfigError
from vitscale_common.errors import UserError


@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps in total; 0: derived from epochs
    epochs: float = 0.0  # used when steps == 0: steps = ceil(epochs * steps per epoch)
    batch_size: int = 4096  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step (per-rank micro batch = batch_size / world / grad_accum)
    clip_grad: float = 1.0  # global gradient-norm clip (paper: 1); 0 = off
    loss: str = "sigmoid"  # sigmoid (paper's pretraining, with head bias -10) | softmax cross-entropy
    ema_decay: float = 0.0  # Polyak averaging of the weights per step (e.g. 0.9999); 0 = off
    max_nonfinite_skips: int = 0  # batches with a non-finite loss skipped before stopping; 0 = stop at the first
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard lines
    watchdog_s: float = 1800.0  # exit with the requeue code when no step finishes for this long; 0 = off
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule

    def validate(self, where: str = "train") -> None:
        if self.loss not in ("sigmoid", "softmax"):
            raise ConfigError(f"{where}.loss: must be sigmoid or softmax, got {self.loss!r}")
        if self.steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"{where}.steps: set train.steps or train.epochs to a positive value")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size and grad_accum must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in [0, 1), got {self.ema_decay}")
        self.optim.validate(f"{where}.optim")


class NonFiniteLoss(UserError):
    pass


def loss_fn(kind: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sigmoid CE sums over classes (as the official code), softmax CE; both mean over the batch."""

    def sigmoid(logits, targets):
        if targets.dim() == 1:
            targets = F.one_hot(targets, num_classes)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]

    def softmax(logits, targets):
        return F.cross_entropy(logits.float(), targets if targets.dim() == 1 else targets.float())

    return sigmoid if kind == "sigmoid" else softmax


class Ema:
    """Polyak average of the weights, fp32, kept whole on every rank (ZeRO stage <= 2)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            self.params[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.params

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.params = {n: t.float().clone() for n, t in state.items()}


@dataclass
class Hooks:
    """What happens at step boundaries; each returns nothing and is collective."""

    save: Callable[[int, bool], Any]  # save a checkpoint of step s; final: the last before exiting
    evaluate: Callable[[int], dict] | None = None  # evaluation results at step s (logged)
    checkpoint_every: int = 0
    eval_every: int = 0


class Trainer:
    def __init__(
        self,
        engine,
        loader,
        cfg: TrainConfig,
        *,
        num_classes: int,
        rank: int,
        log: RunLog,
        hooks: Hooks,
        ema: Ema | None = None,
        flops_per_image: float = 0.0,
        peak_flops: float | None = None,
    ):
        self.engine, self.loader, self.cfg, self.rank, self.log, self.hooks, self.ema = (
            engine,
            loader,
            cfg,
            rank,
            log,
            hooks,
            ema,
        )
        self.loss = loss_fn(cfg.loss, num_classes)
        self.dtype = input_dtype(engine)
        self.flops_per_image, self.peak = flops_per_image, peak_flops
        self.samples_seen = 0
        self.nonfinite_skips = 0

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, stop: StopRequest) -> tuple[float | None, bool]:
        """One optimizer step over the rank's batch: (mean loss, whether any rank asked to stop).

        The loss is None when every rank skipped the batch (non-finite loss on one of them).
        The loss is read once, before backward (the one host sync a step needs), and the
        non-finite and stop flags travel in one collective, so the ranks agree on both.
        """
        losses, stop_now = [], False
        device = self.engine.device
        for x, y in zip(images.chunk(self.cfg.grad_accum), targets.chunk(self.cfg.grad_accum)):
            loss = self.loss(self.engine(x.to(device, self.dtype, non_blocking=True)), y.to(device))
            value = loss.item()
            nonfinite, stop_flag = all_reduce_flags(not math.isfinite(value), stop.requested)
            stop_now = stop_now or stop_flag > 0
            if nonfinite:
                return None, stop_now
            self.engine.backward(loss)
            self.engine.step()
            losses.append(value)
        return sum(losses) / len(losses), stop_now

    def fit(self, start_step: int, total_steps: int, stop: StopRequest, watchdog: Watchdog) -> str:
        """Train steps start_step+1 .. total_steps; returns 'done' or 'stopped' (a signal)."""
        batches: Iterator = iter(self.loader)
        bar = tqdm(total=total_steps, initial=start_step, disable=self.rank != 0, unit="step", dynamic_ncols=True)
        window = _Window()
        step = start_step
        try:
            while step < total_steps:
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=[]):  # loader iterators draw seeds: keep dropout's stream apart
                    images, targets = next(batches)
                t_data = time.perf_counter()
                lr = self.engine.get_lr()[0]  # the rate this step uses
                loss, stop_now = self.train_step(images, targets, stop)
                if loss is None:
                    self._skip_nonfinite(step + 1)
                    continue
                step += 1
                norm = self.engine.get_global_grad_norm()  # None only at stage 0 with clipping off
                grad_norm = None if norm is None else float(norm)
                if grad_norm is not None and not math.isfinite(grad_norm):
                    raise NonFiniteLoss(
                        f"step {step}: gradient norm is {grad_norm}; stopping (resume from the last checkpoint)"
                    )
                if self.ema is not None:
                    self.ema.update(self.engine.module)
                self.samples_seen += self.cfg.batch_size
                watchdog.beat(step)
                window.add(loss, grad_norm, lr, time.perf_counter() - t0, t_data - t0, self.cfg.batch_size)
                bar.update(1)
                if step % self.cfg.log_every == 0 or step == total_steps:
                    self._log(step, window, bar)
                if self.hooks.eval_every and step % self.hooks.eval_every == 0 and step < total_steps:
                    self._evaluate(step)
                final = stop_now or step == total_steps
                if final or (self.hooks.checkpoint_every and step % self.hooks.checkpoint_every == 0):
                    self.hooks.save(step, final)
                watchdog.beat(step)  # evaluation and saving are progress too
                if stop_now:
                    return "stopped"
        finally:
            bar.close()
        self._evaluate(step)
        return "done"

    def _evaluate(self, step: int) -> None:
        if self.hooks.evaluate:
            with torch.random.fork_rng(devices=[]):
                self.log.write(step, "eval", self.hooks.evaluate(step))

    def _skip_nonfinite(self, step: int) -> None:
        self.nonfinite_skips += 1
        if self.nonfinite_skips > self.cfg.max_nonfinite_skips:
            raise NonFiniteLoss(
                f"step {step}: loss is not finite (skipped {self.nonfinite_skips - 1} batches before, "
                f"train.max_nonfinite_skips={self.cfg.max_nonfinite_skips}); stopping"
            )
        if self.rank == 0:
            tqdm.write(
                f"step {step}: non-finite loss, batch skipped ({self.nonfinite_skips}/{self.cfg.max_nonfinite_skips})"
            )

    def _log(self, step: int, window: "_Window", bar) -> None:
        stats = window.flush()
        stats["samples_seen"] = self.samples_seen
        stats["nonfinite_skips"] = self.nonfinite_skips
        # Substituted samples of the whole job, not rank 0's alone (every rank logs at this step).
        stats.update({f"data_{k}": v for k, v in sum_counters(getattr(self.loader, "counters", dict)()).items()})
        if self.peak and self.flops_per_image:
            world = self.engine.world_size
            stats["mfu"] = 3 * self.flops_per_image * stats["images_per_s"] / (self.peak * world)
        gnorm = {"gnorm": f"{stats['grad_norm']:.2f}"} if "grad_norm" in stats else {}
        bar.set_postfix(
            loss=f"{stats['loss']:.4f}",
            lr=f"{stats['lr']:.2e}",
            **gnorm,
            img_s=f"{stats['images_per_s']:.0f}",
            wait=f"{stats['data_wait']:.0%}",
        )
        self.log.write(step, "train", stats)


class _Window:
    """Averages since the last log line."""

    def __init__(self):
        self.flush()

    def add(self, loss, grad_norm, lr, seconds, wait, images):
        self.lr = lr
        self.loss.append(loss)
        self.grad_norm.append(grad_norm)
        self.seconds += seconds
        self.wait += wait
        self.images += images

    def flush(self) -> dict[str, float]:
        out = {}
        if getattr(self, "loss", None):
            out = {
                "loss": sum(self.loss) / len(self.loss),
                "last_loss": self.loss[-1],
                "lr": self.lr,
                "images_per_s": self.images / max(self.seconds, 1e-9),
                "data_wait": self.wait / max(self.seconds, 1e-9),
            }
            known = [g for g in self.grad_norm if g is not None]  # absent where nothing computed it
            if known:
                out["grad_norm"] = sum(known) / len(known)
        self.loss, self.grad_norm, self.seconds, self.wait, self.images = [], [], 0.0, 0.0, 0
        return out
