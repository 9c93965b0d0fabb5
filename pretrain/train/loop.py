"""The training loop, shared by pretraining and fine-tuning.

The step body is: batch, forward, loss, backward, step, log. Everything else happens at
step boundaries, where all ranks agree (one small all-reduce) on whether a stop was
requested, so collective work (checkpoints, evaluation) is always entered by every rank
together. A step with a non-finite gradient on any rank is skipped by DeepSpeed's ZeRO
optimizer on every rank at once (they share the norm), so skips need no agreement of ours.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.model.compile import MODES
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
    max_nonfinite_skips: int = 0  # non-finite steps skipped before stopping; 0 = stop at the first (needs ZeRO 1-3)
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard lines
    # Steps between the ranks agreeing on a stop request (a signal): the one collective the
    # loop adds, and a host sync on a GPU. Also agreed at every log, eval and checkpoint step.
    stop_check_every: int = 10
    compile: str = "none"  # none | blocks: each transformer block compiled in place (ZeRO stages 0-2)
    compile_backend: str = "inductor"  # torch.compile backend for `compile: blocks`
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
        if self.compile not in MODES:
            raise ConfigError(f"{where}.compile: must be one of {', '.join(MODES)}, got {self.compile!r}")
        if self.stop_check_every < 1 or self.log_every < 1:
            raise ConfigError(f"{where}.stop_check_every and log_every must be >= 1")
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
        self._compile_timed = False  # the first step's time, compiling included, is logged once

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One optimizer step over the rank's batch: (mean loss, on the device; whether it applied).

        Every micro-batch runs forward, backward and the engine's step, whatever its loss: the
        accumulation boundary stays where DeepSpeed counts it. At the boundary DeepSpeed's ZeRO
        optimizers skip a step whose gradient norm is not finite on any rank (they share the
        norm), zero the gradients and leave the schedule alone; the engine counts the skip.
        Nothing here reads a device value on the host.
        """
        skipped_before = self.engine.skipped_steps
        device = self.engine.device
        total = None
        for x, y in zip(images.chunk(self.cfg.grad_accum), targets.chunk(self.cfg.grad_accum)):
            loss = self.loss(self.engine(x.to(device, self.dtype, non_blocking=True)), y.to(device))
            self.engine.backward(loss)
            self.engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        return total / self.cfg.grad_accum, self.engine.skipped_steps == skipped_before

    def _device_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) on the engine's device, the next batch's copy under way during each step.

        A loader of `pretrain.data` hands over host batches and the `device_input` that makes the
        model's input of them; any other iterable (benchmarks, tests) yields that input itself.
        """
        inputs = getattr(self.loader, "device_input", None)
        return iter(self.loader) if inputs is None else inputs.ahead(self.loader, self.engine.device)

    def fit(self, start_step: int, total_steps: int, stop: StopRequest, watchdog: Watchdog) -> str:
        """Train steps start_step+1 .. total_steps; returns 'done' or 'stopped' (a signal)."""
        batches = self._device_batches()
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
                loss, applied = self.train_step(images, targets)
                if not applied:
                    self._skip_nonfinite(step + 1)
                    continue
                step += 1
                if self.ema is not None:
                    self.ema.update(self.engine.module)
                self.samples_seen += self.cfg.batch_size
                watchdog.beat(step)
                seconds = time.perf_counter() - t0
                window.add(
                    step, loss, self.engine.get_global_grad_norm(), lr, seconds, t_data - t0, self.cfg.batch_size
                )
                bar.update(1)
                if self.cfg.compile != "none" and not self._compile_timed:
                    window.read()  # the first step's work is done: compiling included
                    self._note(f"step {step} took {time.perf_counter() - t0:.1f} s, compiling the blocks included")
                    self._compile_timed = True
                logs = step % self.cfg.log_every == 0 or step == total_steps
                evals = bool(self.hooks.eval_every) and step % self.hooks.eval_every == 0 and step < total_steps
                saves = bool(self.hooks.checkpoint_every) and step % self.hooks.checkpoint_every == 0
                # Agreed where the step syncs anyway (logging, evaluation, saving), else every N steps.
                checks = logs or evals or saves or step % self.cfg.stop_check_every == 0
                stop_now = checks and all_reduce_flags(stop.requested)[0] > 0
                if logs:
                    self._log(step, window, bar)
                if evals:
                    self._evaluate(step)
                final = stop_now or step == total_steps
                if final or saves:
                    window.check_finite()  # never save weights a non-finite step reached
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
        """The optimizer skipped the step (its weights, moments and schedule are unchanged):
        count it, and stop once more than train.max_nonfinite_skips were skipped."""
        self.nonfinite_skips += 1
        if self.nonfinite_skips > self.cfg.max_nonfinite_skips:
            raise NonFiniteLoss(
                f"step {step}: gradient is not finite on some rank (skipped {self.nonfinite_skips - 1} steps "
                f"before, train.max_nonfinite_skips={self.cfg.max_nonfinite_skips}); stopping"
            )
        self._note(
            f"step {step}: gradient is not finite on some rank; the optimizer skipped the step and the "
            f"batch ({self.nonfinite_skips}/{self.cfg.max_nonfinite_skips})"
        )

    def _note(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

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
    """The steps since the last log line. Losses and norms stay on the device until read."""

    def __init__(self):
        self.flush_times()
        self.steps, self.loss, self.grad_norm = [], [], []

    def add(self, step: int, loss: torch.Tensor, grad_norm, lr: float, seconds: float, wait: float, images: int):
        self.steps.append(step)
        self.loss.append(loss)
        # A scalar tensor DeepSpeed may reuse, a float, or None where nothing computed it (stage 0, no clip).
        self.grad_norm.append(grad_norm.detach().clone() if torch.is_tensor(grad_norm) else grad_norm)
        self.lr = lr
        self.seconds += seconds
        self.wait += wait
        self.images += images

    def read(self) -> tuple[list[float], list[float | None]]:
        """Losses and norms on the host: one transfer each."""
        losses = torch.stack(self.loss).tolist() if self.loss else []
        norms = list(self.grad_norm)
        tensors = [i for i, g in enumerate(norms) if torch.is_tensor(g)]
        if tensors:
            for i, value in zip(tensors, torch.stack([norms[i].float() for i in tensors]).tolist()):
                norms[i] = value
        return losses, norms

    def check_finite(self) -> None:
        """Stop on a step that applied a non-finite loss or gradient norm.

        The ZeRO optimizers skip such steps (train_step), so this catches stage 0, which
        applies whatever it is given, and a loss that is infinite on finite gradients."""
        self._check_finite(*self.read())

    def _check_finite(self, losses: list[float], norms: list[float | None]) -> None:
        for step, loss, norm in zip(self.steps, losses, norms):
            if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
                raise NonFiniteLoss(
                    f"step {step}: loss {loss}, gradient norm {norm}, and the step was applied (only ZeRO "
                    f"stages 1-3 skip a non-finite step); stopping before anything is saved: resume from "
                    f"the last checkpoint"
                )

    def flush(self) -> dict[str, float]:
        out = {}
        if self.loss:
            losses, norms = self.read()
            self._check_finite(losses, norms)
            out = {
                "loss": sum(losses) / len(losses),
                "last_loss": losses[-1],
                "lr": self.lr,
                "images_per_s": self.images / max(self.seconds, 1e-9),
                "data_wait": self.wait / max(self.seconds, 1e-9),
            }
            known = [g for g in norms if g is not None]
            if known:
                out["grad_norm"] = sum(known) / len(known)
        self.flush_times()
        self.steps, self.loss, self.grad_norm = [], [], []
        return out

    def flush_times(self) -> None:
        self.seconds, self.wait, self.images = 0.0, 0.0, 0
