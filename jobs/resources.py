"""Memory-aware placement: worker budgets, per-trial resource requests, fit/downsize/refuse.

Each trial's peak memory is estimated before launch: one training step of its model
(`model.memory`) plus what the trial holds besides (`TrialOverhead`: the framework as the epoch
loop runs it, measured at the search's calibration, and its copies of the data). The trial then
asks Ray for that much memory (`memory` on CPU workers; on GPU workers a GPU fraction plus the
custom resource `gpu_memory_mb` for the model's step, and `memory` for the host side), so Ray
packs trials by memory. A config too big for the largest
worker is downsized to a smaller micro-batch with gradient accumulation (same effective batch),
or refused when even the smallest micro-batch does not fit.

GPU nodes may differ in per-GPU memory. `gpu_memory_mb` is per node (summed over its GPUs), so on
its own it cannot keep a trial off a node whose every card is too small, nor keep a fractional
request from overfilling one small card. So the GPU fraction is taken of the smallest card the
trial fits on (never more than its share of any card it may land on), and nodes whose cards are
all too small are excluded with a label selector on their Ray node id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GPU_MEMORY_RESOURCE = "gpu_memory_mb"
# Bytes of one 48x48 grey image (uint8), the unit of every data copy a trial holds.
IMAGE_BYTES = 48 * 48
# Host memory a trial holds besides its model's step when no calibration measured it: about
# what the calibration measures on a CPU worker (bench/bench_memory.py).
DEFAULT_RUNTIME_BYTES = 64 << 20
# Every epoch's checkpoint: Keras writes a .keras file's weights (and optimizer state) into an
# in-memory buffer, then copies that buffer into the zip archive, so a save holds about twice
# the model's saved state at once.
CHECKPOINT_FACTOR = 2.0
NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class WorkerBudget:
    """The most memory one trial can be given on the largest worker of the cluster."""

    kind: str  # "gpu" or "cpu"
    bytes_per_worker: int
    source: str  # how it was found (logged on the parent run)
    # (Ray node id, memory per GPU) of every alive GPU node; empty: all cards are bytes_per_worker
    gpu_nodes: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        return f"{self.kind} worker, {self.bytes_per_worker / GIB:.2f} GiB ({self.source})"


@dataclass(frozen=True)
class TrialOverhead:
    """Host memory a trial holds besides one training step of its model (`model.memory`).

    `runtime_bytes`: the framework as the epoch loop runs it (traced train and predict
    functions, input pipelines, the allocator's growth over epochs), measured on a worker at
    the search's calibration (`jobs.timing`). The checkpoint term is CHECKPOINT_FACTOR times
    the model's saved state (weights and optimizer slots). The data term follows
    from what the epoch loop copies (`jobs/training.py`): its share of the training rows (a
    copy when it trains on a share), the training tensor (TensorFlow copies the object
    store's read-only array), the validation tensor and its mirror image.
    The rows themselves arrive through Ray's object store, accounted by Ray's
    `object_store_memory`, not by the trial's reservation (see `jobs.trial.measured_memory`).
    """

    runtime_bytes: int = DEFAULT_RUNTIME_BYTES
    source: str = "default"

    def data_bytes(self, train_rows: int, val_rows: int, train_fraction: float = 1.0) -> int:
        """Host bytes of the data copies of a trial on `train_rows` (its own share already
        taken) and `val_rows`."""
        copies = 1 + (1 if train_fraction < 1.0 else 0)
        return int((copies * max(0, train_rows) + 2 * max(0, val_rows)) * IMAGE_BYTES)

    @staticmethod
    def checkpoint_bytes(state_bytes: int) -> int:
        """Host bytes an epoch's checkpoint holds while a model of `state_bytes` saved state
        (weights and optimizer slots) is written."""
        return int(CHECKPOINT_FACTOR * state_bytes)

    def host_bytes(
        self, train_rows: int, val_rows: int, train_fraction: float = 1.0, state_bytes: int = 0
    ) -> int:
        return (
            self.runtime_bytes
            + self.data_bytes(train_rows, val_rows, train_fraction)
            + self.checkpoint_bytes(state_bytes)
        )


@dataclass
class Placement:
    status: str  # "fits", "downsized", "does_not_fit"
    # What counts against the worker budget: the whole trial on a CPU worker, the model's
    # training step on a GPU worker (the card holds it; `host_bytes` is in host memory).
    estimated_bytes: int
    micro_batch_size: int
    resources: dict[str, float] = field(default_factory=dict)
    gpu_memory_limit_mb: float = 0.0
    reason: str = ""
    min_estimated_bytes: int = 0  # at the smallest micro-batch tried (refusals only)
    # Ray bundle label selector; on a mixed-GPU cluster, keeps the trial off too-small cards
    label_selector: dict[str, str] = field(default_factory=dict)
    host_bytes: int = 0  # host memory reserved: the whole trial on CPU, its host side on GPU

    @property
    def estimated_mb(self) -> float:
        return self.estimated_bytes / MIB

    @property
    def host_mb(self) -> float:
        return self.host_bytes / MIB


def budget_from_nodes(nodes: list[dict[str, Any]], worker_memory_gb: float = 0.0) -> WorkerBudget:
    """Budget from `ray.nodes()`: per-GPU memory where GPU workers exist, else node memory.

    A trial must fit on one card of one node, so the budget is the largest card of any node;
    each node's own card size is kept for the per-trial request (see `_resources`).
    `worker_memory_gb` > 0 overrides the detected size (same kind).
    """
    alive = [node for node in nodes if node.get("Alive", True)]
    gpu_nodes = []
    for node in alive:
        resources = node.get("Resources", {})
        gpus = resources.get("GPU", 0)
        if gpus >= 1 and resources.get(GPU_MEMORY_RESOURCE, 0) > 0:
            per_gpu = resources[GPU_MEMORY_RESOURCE] / gpus * MIB
        elif gpus >= 1:
            # GPU worker that does not declare its memory: assume the smallest common card.
            per_gpu = 16 * GIB
        else:
            continue
        gpu_nodes.append((str(node.get("NodeID", "")), int(per_gpu)))
    if worker_memory_gb > 0:
        kind = "gpu" if gpu_nodes else "cpu"
        return WorkerBudget(kind, int(worker_memory_gb * GIB), "worker_memory_gb parameter")
    if gpu_nodes:
        return WorkerBudget(
            "gpu",
            max(size for _, size in gpu_nodes),
            f"largest GPU ({GPU_MEMORY_RESOURCE})",
            tuple(gpu_nodes),
        )
    memories = [node.get("Resources", {}).get("memory", 0) for node in alive]
    if not memories or max(memories) <= 0:
        raise RuntimeError("no alive Ray node reports a memory resource; cannot size trials")
    return WorkerBudget("cpu", int(max(memories)), "largest node's Ray memory resource")


def _resources(
    budget: WorkerBudget, estimated: int, cpus: float, host: int = 0
) -> tuple[dict[str, float], float, dict[str, str]]:
    """Ray resources, TF GPU memory limit (MiB) and label selector of a trial of `estimated`
    (on a GPU worker: on the card; `host` bytes besides in host memory)."""
    if budget.kind == "gpu":
        # The share is of the smallest card the trial fits on: on a bigger card it over-reserves
        # a little, but the shares on any one card never add up to more than that card holds.
        card = min(
            (size for _, size in budget.gpu_nodes if size >= estimated),
            default=budget.bytes_per_worker,
        )
        share = min(1.0, math.ceil(estimated / card * 100) / 100)
        mb = math.ceil(estimated / MIB)
        limit = share * card / MIB
        # Nodes whose cards are all too small could still pass the node-wide gpu_memory_mb
        # check (several small cards); keep the trial off them. Nodes that join later are not
        # known here: keep each node group's cards alike and declare them (infra/README.md).
        too_small = sorted(node for node, size in budget.gpu_nodes if size < estimated and node)
        selector = {NODE_ID_LABEL: f"!in({','.join(too_small)})"} if too_small else {}
        resources = {"CPU": cpus, "GPU": share, GPU_MEMORY_RESOURCE: mb}
        if host > 0:
            resources["memory"] = float(host)
        return resources, limit, selector
    return {"CPU": cpus, "memory": float(estimated)}, 0.0, {}


def place(
    model: Any,
    batch_size: int,
    optimizer: str,
    budget: WorkerBudget,
    cpus_per_trial: float,
    min_micro_batch: int = 4,
    compute_dtype: str = "float32",
    host_overhead_bytes: int = 0,
) -> Placement:
    """Decide how (or whether) a trial runs within `budget` (`compute_dtype`: the activations'
    dtype, "bfloat16" or "float16" under mixed precision; `host_overhead_bytes`: what the trial
    holds in host memory besides its model's step, `TrialOverhead.host_bytes`)."""
    from model.memory import estimate_training_memory

    on_card = budget.kind == "gpu"

    def needs(micro: int) -> int:
        """Bytes counted against the budget at `micro`-row steps (the rest of the batch
        accumulated): the card's share on a GPU worker, everything on a CPU worker."""
        step = estimate_training_memory(
            model,
            micro,
            optimizer=optimizer,
            accumulation_steps=batch_size // micro,
            compute_dtype=compute_dtype,
        )
        return step if on_card else step + host_overhead_bytes

    def placed(status: str, estimated: int, micro: int, reason: str = "") -> Placement:
        host = host_overhead_bytes if on_card else estimated
        resources, limit, selector = _resources(budget, estimated, cpus_per_trial, host)
        return Placement(
            status,
            estimated,
            micro,
            resources,
            limit,
            reason,
            label_selector=selector,
            host_bytes=host,
        )

    estimated = needs(batch_size)
    if estimated <= budget.bytes_per_worker:
        return placed("fits", estimated, batch_size)
    micro = batch_size
    while micro // 2 >= min_micro_batch and batch_size % (micro // 2) == 0:
        micro //= 2
        estimated_micro = needs(micro)
        if estimated_micro <= budget.bytes_per_worker:
            return placed(
                "downsized",
                estimated_micro,
                micro,
                f"batch {batch_size} needs {estimated / MIB:.0f} MiB > {budget.describe()}; "
                f"micro-batch {micro} x {batch_size // micro} accumulation steps",
            )
    # With accumulation a micro-batch keeps one more copy of the weights: for a model whose
    # weights outweigh its activations (a DNN), the smallest micro-batch needs more.
    smallest = min(estimated, needs(micro)) if micro < batch_size else estimated
    return Placement(
        "does_not_fit",
        estimated,
        micro,
        reason=(
            f"needs {estimated / MIB:.0f} MiB at batch {batch_size} and at least "
            f"{smallest / MIB:.0f} MiB at any micro-batch down to {micro}; largest worker: "
            f"{budget.describe()}"
        ),
        min_estimated_bytes=smallest,
        host_bytes=host_overhead_bytes if on_card else estimated,
    )
