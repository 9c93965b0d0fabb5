"""One rank of a stream test, as its own process: `python stream_rank.py SPEC.json OUT.json`.

SPEC holds the data config, world size, rank, seed, global batch, how many batches to take and
an optional saved state to resume from. OUT gets each batch's targets and an image digest, the
state after the last batch, and the loss counters.
"""

import hashlib
import json
import sys

from pretrain.data.loaders import DataConfig, build_train_loader


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    loader = build_train_loader(
        DataConfig(**spec["data"]), img_size=spec["img_size"], global_batch=spec["global_batch"],
        rank=spec["rank"], world_size=spec["world_size"], seed=spec["seed"],
    )  # fmt: skip
    if spec.get("state"):
        loader.load_state_dict(spec["state"])
    batches = []
    for i, batch in enumerate(loader):
        digest = hashlib.sha1(batch.images.numpy().tobytes()).hexdigest()
        batches.append({"targets": batch.targets.tolist(), "digest": digest})
        if i + 1 == spec["batches"]:
            break
    out = {"batches": batches, "state": loader.state_dict(), "counters": loader.counters(),
           "steps_per_epoch": loader.steps_per_epoch}  # fmt: skip
    open(out_path, "w").write(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
