"""Memory-aware placement: worker budgets, per-trial resource requests, fit/downsize/refuse.

Each trial's peak training memory is estimated before launch (`model.memory`). The trial then
asks Ray for that much memory (`memory` on CPU workers; a GPU fraction plus the custom resource
`gpu_memory_mb` on GPU workers), so Ray packs trials by memory. A config too big for the largest
worker is downsized to a smaller micro-batch with gradient accumulation (same effective batch),
or refused when even the smallest micro-batch does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GPU_MEMORY_RESOURCE = "gpu_memory_mb"
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class WorkerBudget:
    """The most memory one trial can be given on the largest worker of the cluster."""

    kind: str  # "gpu" or "cpu"
    bytes_per_worker: int
    source: str  # how it was found (logged on the parent run)

    def describe(self) -> str:
        return f"{self.kind} worker, {self.bytes_per_worker / GIB:.2f} GiB ({self.source})"


@dataclass
class Placement:
    status: str  # "fits", "downsized", "does_not_fit"
    estimated_bytes: int
    micro_batch_size: int
    resources: dict[str, float] = field(default_factory=dict)
    gpu_memory_limit_mb: float = 0.0
    reason: str = ""
    min_estimated_bytes: int = 0  # at the smallest micro-batch tried (refusals only)

    @property
    def estimated_mb(self) -> float:
        return self.estimated_bytes / MIB


def budget_from_nodes(nodes: list[dict[str, Any]], worker_memory_gb: float = 0.0) -> WorkerBudget:
    """Budget from `ray.nodes()`: per-GPU memory where GPU workers exist, else node memory.

    `worker_memory_gb` > 0 overrides the detected size (same kind).
    """
    alive = [node for node in nodes if node.get("Alive", True)]
    gpu_sizes = []
    for node in alive:
        resources = node.get("Resources", {})
        gpus = resources.get("GPU", 0)
        if gpus >= 1 and resources.get(GPU_MEMORY_RESOURCE, 0) > 0:
            gpu_sizes.append(resources[GPU_MEMORY_RESOURCE] / gpus * MIB)
        elif gpus >= 1:
            # GPU worker that does not declare its memory: assume the smallest common card.
            gpu_sizes.append(16 * GIB)
    if worker_memory_gb > 0:
        kind = "gpu" if gpu_sizes else "cpu"
        return WorkerBudget(kind, int(worker_memory_gb * GIB), "worker_memory_gb parameter")
    if gpu_sizes:
        return WorkerBudget("gpu", int(max(gpu_sizes)), f"largest GPU ({GPU_MEMORY_RESOURCE})")
    memories = [node.get("Resources", {}).get("memory", 0) for node in alive]
    if not memories or max(memories) <= 0:
        raise RuntimeError("no alive Ray node reports a memory resource; cannot size trials")
    return WorkerBudget("cpu", int(max(memories)), "largest node's Ray memory resource")


def _resources(budget: WorkerBudget, estimated: int, cpus: float) -> tuple[dict[str, float], float]:
    if budget.kind == "gpu":
        share = min(1.0, math.ceil(estimated / budget.bytes_per_worker * 100) / 100)
        mb = math.ceil(estimated / MIB)
        limit = share * budget.bytes_per_worker / MIB
        return {"CPU": cpus, "GPU": share, GPU_MEMORY_RESOURCE: mb}, limit
    return {"CPU": cpus, "memory": float(estimated)}, 0.0


def place(
    model: Any,
    batch_size: int,
    optimizer: str,
    budget: WorkerBudget,
    cpus_per_trial: float,
    min_micro_batch: int = 4,
) -> Placement:
    """Decide how (or whether) a trial runs within `budget`."""
    from model.memory import estimate_training_memory

    estimated = estimate_training_memory(model, batch_size, optimizer=optimizer)
    if estimated <= budget.bytes_per_worker:
        resources, limit = _resources(budget, estimated, cpus_per_trial)
        return Placement("fits", estimated, batch_size, resources, limit)
    micro = batch_size
    while micro // 2 >= min_micro_batch and batch_size % (micro // 2) == 0:
        micro //= 2
        estimated_micro = estimate_training_memory(model, micro, optimizer=optimizer)
        if estimated_micro <= budget.bytes_per_worker:
            resources, limit = _resources(budget, estimated_micro, cpus_per_trial)
            return Placement(
                "downsized",
                estimated_micro,
                micro,
                resources,
                limit,
                f"batch {batch_size} needs {estimated / MIB:.0f} MiB > {budget.describe()}; "
                f"micro-batch {micro} x {batch_size // micro} accumulation steps",
            )
    smallest = estimate_training_memory(model, micro, optimizer=optimizer)
    return Placement(
        "does_not_fit",
        estimated,
        micro,
        reason=(
            f"needs {estimated / MIB:.0f} MiB at batch {batch_size} and "
            f"{smallest / MIB:.0f} MiB at micro-batch {micro}; largest worker: {budget.describe()}"
        ),
        min_estimated_bytes=smallest,
    )
