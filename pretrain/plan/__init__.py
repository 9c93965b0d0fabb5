"""vit-plan: memory, step time, loader and checkpoint cost of a pretraining config on a cluster,
worked out before the job is queued (docs/SCALE.md).

    from pretrain.plan import Cluster, make_plan
    plan = make_plan(["configs/pretrain/vit_h14_jft.yaml"], cluster=Cluster(nodes=8, gpus_per_node=8, gpu="h100"))
    print(plan.summary())
"""

from pretrain.plan.hardware import Assumptions, Cluster, Gpu, load_gpus
from pretrain.plan.planner import Plan, make_plan

__all__ = ["Assumptions", "Cluster", "Gpu", "Plan", "load_gpus", "make_plan"]
