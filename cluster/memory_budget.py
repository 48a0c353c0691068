"""What an expert worker may hold: --worker-memory over the bytes of one expert as held.

The bytes come from the model's shapes, the compute dtype and --quantize (workers/grouped_mlp.py
counts them as the worker will hold them), so Mixtral 8x7B's plan is checked from its config.json
alone, before any weight is read: `expertmesh plan --model DIR --workers 8 --worker-memory 12GiB`.
"""

from __future__ import annotations

import torch

from expertmesh.cluster.placement import MemoryBudget, PlacementError, gib
from expertmesh.core.config import MixtralConfig
from expertmesh.core.settings import ServingConfig
from expertmesh.workers.grouped_mlp import LayerExperts


def expert_bytes(config: MixtralConfig, settings: ServingConfig, gpus: bool) -> int:
    """Bytes one (layer, expert) takes on a worker."""
    return LayerExperts.bytes_per_expert(config.hidden_size, config.intermediate_size, getattr(torch, settings.dtype),
                                         settings.quantize, "cuda" if gpus else "cpu")


def memory_budget(config: MixtralConfig, settings: ServingConfig, gpus: bool) -> MemoryBudget | None:
    """The budget --worker-memory sets (None: no limit)."""
    if settings.worker_bytes is None:
        return None
    budget = MemoryBudget(settings.worker_bytes, expert_bytes(config, settings, gpus))
    if budget.experts < 1:
        raise PlacementError(f"--worker-memory {settings.worker_memory} holds no expert of this model "
                             f"({gib(budget.expert_bytes)} each at {settings.dtype}, --quantize {settings.quantize})")
    return budget
