"""The plan as text: what vit-plan prints."""

from __future__ import annotations

from pretrain.plan.hardware import GIB
from pretrain.plan.planner import Option, Plan


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _option_row(plan: Plan, o: Option, mark: str = "") -> str:
    fit = "yes" if plan.fits(o) else "no"
    ckpt = "on" if o.checkpointing else "off"
    return (f"| {o.stage}{mark} | {o.micro_batch} x {o.grad_accum} | {ckpt} | {_gib(o.total)} | {fit} | "
            f"{1e3 * o.time.step_s:.0f} | {plan.cfg.train.batch_size / o.time.step_s:,.0f} |")  # fmt: skip


def render(plan: Plan) -> str:
    cfg, o, gpu, c = plan.cfg, plan.configured, plan.gpu, plan.cluster
    t = o.time
    lines = [plan.summary(), ""]
    lines += [f"Memory per GPU ({o.describe()}; {cfg.zero.precision} weights, "
              f"{cfg.zero.grad_dtype if cfg.zero.precision == 'bf16' else 'fp32'} gradients), GiB:"]  # fmt: skip
    width = max(len(k) for k in o.memory)
    lines += [f"  {k:<{width}}  {_gib(v):>8}" for k, v in o.memory.items()]
    lines += [f"  {'total':<{width}}  {_gib(o.total):>8}  of {gpu.memory_gib:.1f}", ""]
    lines += [
        f"Step ({c.world} GPUs, global batch {cfg.train.batch_size}):",
        f"  compute            {1e3 * t.compute_s:8.1f} ms  (MFU {100 * plan.calibration.mfu:.1f}%: "
        f"{plan.calibration.source})",
        f"  gradient reduction {1e3 * t.reduce_s:8.1f} ms on the wire",
        f"  parameter gathers  {1e3 * t.gather_s:8.1f} ms on the wire",
        f"  exposed            {1e3 * t.exposed_comm_s:8.1f} ms  (zero.overlap_comm={str(cfg.zero.overlap_comm).lower()}; "
        f"{t.sent_bytes / 1e9:.2f} GB sent per GPU over {'NVLink' if c.nodes == 1 else 'the network'})",
        f"  step               {1e3 * t.step_s:8.1f} ms: {plan.images_per_s:,.0f} img/s, "
        f"{plan.images_per_s / c.world:,.1f} per GPU, MFU {100 * plan.mfu:.1f}%",
    ]
    if plan.days is not None:
        lines.append(f"  run                {plan.total_steps:,} steps: {plan.days:.2f} days, "
                     f"{plan.days * c.world:,.0f} GPU-days")  # fmt: skip
    else:
        lines.append("  run                length unknown: train.epochs needs data.path or --train-samples")
    ck = plan.checkpoint
    lines += [
        "",
        f"Loader: {plan.loader_cores_per_gpu:.2f} cores per GPU (data.decode={cfg.data.decode}, "
        f"{plan.assume.loader_images_per_core_s[cfg.data.decode]:g} img/s per core)",
        f"Checkpoint: {ck.bytes / 1e9:.1f} GB, written in {ck.write_s:.1f} s at {plan.assume.checkpoint_write_gbs:g} GB/s; "
        f"training waits {ck.blocked_s:.1f} s per save, {100 * ck.fraction:.2f}% of the time at "
        f"checkpoint.every={cfg.checkpoint.every}",
        "",
        "Stages and checkpointing at this micro-batch:",
        "| ZeRO stage | micro-batch x accumulation | act. ckpt | GiB per GPU | fits | ms/step | img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for alt in plan.alternatives:
        same = alt.stage == o.stage and alt.checkpointing == o.checkpointing
        lines.append(_option_row(plan, alt, " (configured)" if same else ""))
    r = plan.recommended
    lines.append("")
    if r is None:
        lines.append("Recommendation: nothing fits this GPU at this world size; use more GPUs")
    else:
        lines.append(f"Recommendation: {r.describe()}: {cfg.train.batch_size / r.time.step_s:,.0f} img/s, "
                     f"{_gib(r.total)} GiB  ({r.overrides()})")  # fmt: skip
    lines += [f"Warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
