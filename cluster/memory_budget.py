"""What an expert worker may hold: --worker-memory over the bytes of one expert as held.

The bytes come from the model's shapes, the compute dtype and --quantize (workers/grouped_mlp.py
counts them as the worker will hold them), so Mixtral 8x7B's plan is checked from its config.json
alone, before any weight is read: `expertmesh plan --model DIR --workers 8 --worker-memory 12GiB`.
"""

from __future__ import annotations

import torch

from expertmesh.cluster.placement import MemoryBudget, PlacementError, PlacementPlan, gib
from expertmesh.core.config import MixtralConfig
from expertmesh.core.settings import ServingConfig
from expertmesh.workers.grouped_mlp import LayerExperts


def expert_bytes(config: MixtralConfig, settings: ServingConfig, gpus: bool) -> int:
    """Bytes one (layer, expert) takes on a worker."""
    return LayerExperts.bytes_per_expert(config.hidden_size, config.intermediate_size, getattr(torch, settings.dtype),
                                         settings.quantize, "cuda" if gpus else "cpu")


def memory_budget(settings: ServingConfig, expert_bytes: int) -> MemoryBudget | None:
    """The budget --worker-memory sets for experts of `expert_bytes` (None: no limit)."""
    if settings.worker_bytes is None:
        return None
    budget = MemoryBudget(settings.worker_bytes, expert_bytes)
    if budget.experts < 1:
        raise PlacementError(f"--worker-memory {settings.worker_memory} holds no expert of this model "
                             f"({gib(budget.expert_bytes)} each at {settings.dtype}, --quantize {settings.quantize})")
    return budget


def redundancy_shortfall(plan: PlacementPlan, redundancy: int) -> str | None:
    """What to tell the operator when --worker-memory left some expert short of --redundancy's copies."""
    if plan.min_copies() >= min(redundancy, plan.num_workers):
        return None
    return (f"--redundancy {redundancy}: --worker-memory leaves room for fewer copies of some experts (at least "
            f"{plan.min_copies()} each) on {plan.num_workers} workers")
