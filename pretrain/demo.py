"""vit-demo: the whole vitscale pipeline, end to end, on data that ships with scikit-learn.

    vit-demo [--out demo_out] [--nproc 2] [--pretrain key=value ...] [--finetune key=value ...]

1. convert the 1,797 real 8x8 digit scans (stored upsampled to 32x32) into WebDataset
   shards with train/val/test splits,
2. pretrain a small ViT on them at 16 px with the DeepSpeed trainer over 2 CPU processes,
3. score the pretrained model on the test split, at 16 px and, with its position
   embeddings interpolated and no training at all, at 32 px,
4. fine-tune it at 32 px (twice the resolution: the sequence grows from 16 to 64 patches),
5. draw the paper's inspection figures for the fine-tuned model,
and print a summary table with the path of everything written.

Every stage is the same command a user would type (each is printed before it runs), and
every stage resumes: interrupt the demo at any point and run it again to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vitscale_common.errors import UserError, cli_entry

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRETRAIN_RES, FINETUNE_RES = 16, 32


@dataclass
class DemoPaths:
    out: Path

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def pretrain(self) -> Path:
        return self.out / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.out / "finetune"

    @property
    def evals(self) -> Path:
        return self.out / "eval"

    @property
    def report(self) -> Path:
        return self.out / "report"


def run_stage(title: str, argv: list[str]) -> float:
    """Run one stage as its own command (exactly what a user would type); returns seconds."""
    print(f"\n== {title}\n$ {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    # A stage that fails (or is interrupted) stops the demo; its outputs are resumable.
    rc = subprocess.call(argv)
    if rc != 0:
        raise UserError(
            f"stage '{title}' failed with exit code {rc}; fix the cause and rerun "
            "vit-demo: finished stages are kept and interrupted ones resume"
        )
    return time.monotonic() - start


def launcher(nproc: int, module: str) -> list[str]:
    """torchrun on a free port (several demos or tests may run side by side)."""
    if nproc == 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]


def test_scores(eval_dir: Path, resolution: int) -> dict:
    """vit-eval's test-split results at `resolution`: samples scored, top-1, top-5."""
    (result,) = eval_dir.glob(f"*-test-{resolution}px.json")
    return json.loads(result.read_text())["results"]


def summary_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for n, row in enumerate(rows):
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="vit-demo",
        description=__doc__.split("\n\n")[0],
        epilog="Rerunning with the same --out resumes. Extra key=value overrides go to one stage, "
        "e.g. --pretrain train.epochs=5 --finetune train.epochs=2 for a quick look.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything (default: demo_out)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (DeepSpeed ranks, gloo on CPU)")
    p.add_argument("--pretrain", nargs="*", default=[], metavar="key=value", help="overrides for the pretraining stage")
    p.add_argument("--finetune", nargs="*", default=[], metavar="key=value", help="overrides for the fine-tune stage")
    p.add_argument("--no-report", action="store_true", help="skip the inspection figures")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    paths = DemoPaths(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores
    python = sys.executable
    timings = {}

    timings["convert"] = run_stage(
        "convert the digits into shards",
        [python, "-m", "data_prep.cli", "convert", "--source", "digits", "--output", str(paths.shards)],
    )

    timings["pretrain"] = run_stage(
        f"pretrain at {PRETRAIN_RES} px",
        launcher(args.nproc, "pretrain.train")
        + [
            str(CONFIGS / "pretrain" / "demo.yaml"),
            f"data.path={paths.shards}",
            f"run.dir={paths.pretrain}",
            *args.pretrain,
        ],
    )

    timings["evaluate"] = 0.0
    for resolution in (PRETRAIN_RES, FINETUNE_RES):
        timings["evaluate"] += run_stage(
            f"score the pretrained model at {resolution} px",
            [
                python,
                "-m",
                "pretrain.evaluate",
                str(paths.pretrain),
                "--data",
                str(paths.shards),
                "--split",
                "test",
                "--resolution",
                str(resolution),
                "--out",
                str(paths.evals),
            ],
        )

    timings["finetune"] = run_stage(
        f"fine-tune at {FINETUNE_RES} px",
        launcher(args.nproc, "pretrain.finetune")
        + [
            str(CONFIGS / "finetune" / "demo.yaml"),
            f"init.weights={paths.pretrain}",
            f"data.path={paths.shards}",
            f"run.dir={paths.finetune}",
            *args.finetune,
        ],
    )

    if not args.no_report:
        timings["inspect"] = run_stage(
            "inspect the fine-tuned model",
            [python, "-m", "pretrain.inspection.run", str(paths.finetune), "--out", str(paths.report)],
        )

    scored = [
        ("pretrained", PRETRAIN_RES, test_scores(paths.evals, PRETRAIN_RES)),
        ("pretrained, pos-emb interpolated", FINETUNE_RES, test_scores(paths.evals, FINETUNE_RES)),
        ("fine-tuned", FINETUNE_RES, json.loads((paths.finetune / "results.json").read_text())["results"]["test"]),
    ]
    rows = [("model", "images at", "test images scored", "test top-1")]
    rows += [(name, f"{res} px", str(r["samples"]), f"{r['top1']:.4f}") for name, res, r in scored]
    print("\n" + summary_table(rows))
    print("\ntime: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(
        f"\nwrote:\n  shards        {paths.shards}  (vit-prep info {paths.shards})\n"
        f"  pretraining   {paths.pretrain}  (config.yaml, metrics.jsonl, tb/, checkpoints/)\n"
        f"  evaluations   {paths.evals}\n"
        f"  fine-tuning   {paths.finetune}  (results.md)"
    )
    if not args.no_report:
        print(f"  figures       {paths.report / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
