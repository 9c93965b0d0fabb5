"""Run in a fresh process by test_prep_scale.py: plan one array task of a 14M listing.

Prints the peak resident memory (bytes) after listing, caching, planning, and computing
the listing rows of every shard the task owns.
"""

import resource
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.config import PrepConfig
from data_prep.convert import load_listing, plan_document
from data_prep.plan import Plan
from data_prep.sources import register_source
from data_prep.sources.base import Listing, Source

N = int(sys.argv[2])


@register_source("synthetic_in21k")
class SyntheticListing(Source):
    """14M ImageNet-21k-like ids (`n01234567/n01234567_1234567.JPEG`), 21,841 classes."""

    def list_items(self) -> Listing:
        # Built in 1M-row chunks, as a real lister would stream them, so the test measures
        # the planner rather than temporaries of this generator.
        ids, labels = [], []
        for start in range(0, N, 1_000_000):
            idx = pa.array(np.arange(start, min(start + 1_000_000, N)))
            synset = pc.cast(pc.add(pc.divide(idx, 642), 1_000_000), pa.string())
            ids.append(
                pc.binary_join_element_wise("n0", synset, "/n0", synset, "_", pc.cast(idx, pa.string()), ".JPEG", "")
            )
            labels.append(pc.cast(pc.divide(idx, 642), pa.int32()))
        table = pa.table({"source_id": pa.chunked_array(ids), "label": pa.chunked_array(labels)})
        return Listing(table, [(f"c{i}", f"c{i}") for i in range(N // 642 + 1)], "single")

    def read(self, item):
        raise NotImplementedError


def main() -> None:
    out = Path(sys.argv[1])
    cfg = PrepConfig(output=str(out), samples_per_shard=10000, splits="train=0.99,val=0.01")
    source = SyntheticListing(cfg.source)
    listing = load_listing(source, out)
    doc = plan_document(cfg, source, listing)
    del listing
    # A second task: maps the cached listing instead of listing again.
    listing = load_listing(source, out)
    plan = Plan.from_dict(doc["plan"])
    rows = 0
    for task in plan.shards_for_task(7, 64):
        rows += len(listing.items.take(pa.array(plan.listing_indices(task))).column("source_id").to_pylist())
    print(rows, len(plan.shards()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


if __name__ == "__main__":
    main()
