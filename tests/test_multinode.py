"""Multi-node placement on one machine: a CPU-only head and two fake GPU workers that differ in
GPU count and per-GPU memory (Ray's own `ray.cluster_utils.Cluster`, every server on loopback).

Worker A has one big card, worker B two small cards that together hold more than A's one. A
search through the real code path (`run_search`, MLflow in SQLite) must then put each trial only
where one card holds it, pack small trials onto one GPU, and refuse up front what fits no card.
TensorFlow sees no GPU on these fake nodes, so the trials train on the CPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import child_runs
from jobs.resources import (
    GPU_MEMORY_RESOURCE,
    MIB,
    NODE_ID_LABEL,
    WorkerBudget,
    budget_from_nodes,
    place,
)
from jobs.search import Strategy, plan_trials, run_search
from jobs.settings import SearchSettings
from model.dnn import DNNConfig
from schema import run as layout
from viz_helpers import dnn_plan, write_fer_csv

LOOPBACK = "127.0.0.1"


# One trial that only A's big card holds, three small ones (they differ a little), one that no
# card holds. `large` comes first, so Tune asks for it while both workers are free: without
# the label selector that keeps it off B, Ray puts it on B (whose two cards together admit it).
PLANS = [
    dnn_plan("large", (2048,)),
    dnn_plan("small-16", (16,)),
    dnn_plan("small-24", (24,)),
    dnn_plan("small-32", (32,)),
    dnn_plan("huge", (4096, 4096)),
]
SMALL = ("small-16", "small-24", "small-32")


def search_settings(tmp_path: Path, data: Path) -> SearchSettings:
    return SearchSettings(
        data=str(data),
        families="dnn",
        num_samples=len(PLANS),
        max_epochs=1,
        grace_epochs=1,
        time_budget_min=10,
        storage=str(tmp_path / "tune"),
        name="multinode",
        cpus_per_trial=1,
        max_failures=0,
        register=False,
    )


@dataclass
class FakeCluster:
    address: str
    head: str  # Ray node ids
    gpu_a: str  # 1 GPU of big_card_mb
    gpu_b: str  # 2 GPUs of small_card_mb each
    big_card_mb: int
    small_card_mb: int

    def card_mb(self, node_id: str) -> int:
        return {self.gpu_a: self.big_card_mb, self.gpu_b: self.small_card_mb}.get(node_id, 0)


def card_sizes(settings: SearchSettings) -> tuple[int, int]:
    """A's and B's MiB per GPU, from the plans' own estimates (so the scenario holds whatever
    the estimator's constants): A's card holds `large` plus three small trials; B's cards are
    1 MiB short of `large`, but B's two together hold more than A's one."""
    refuse_all = WorkerBudget("gpu", 1, "probe: every plan refused, with its smallest estimate")
    probe = {e["plan"]["name"]: e["placement"] for e in plan_trials(settings, refuse_all, PLANS)}
    need = {name: math.ceil(p["estimated_mb"]) for name, p in probe.items()}
    small = max(need[name] for name in SMALL)
    big_card = need["large"] + 3 * small
    small_card = need["large"] - 1
    assert small <= small_card, need  # a small trial fits on one of B's cards
    # B's node-wide gpu_memory_mb alone would admit `large`: only the label selector stops it.
    assert 2 * small_card > big_card, need
    assert probe["huge"]["min_estimated_mb"] > big_card, probe["huge"]  # fits no card
    return big_card, small_card


def start_cluster(big_card_mb: int, small_card_mb: int) -> tuple[Any, FakeCluster]:
    """Head (1 CPU, no GPU), worker A (1 GPU), worker B (2 GPUs); fake CPUs and GPUs."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "node_ip_address": LOOPBACK,
        },
    )
    try:
        a = cluster.add_node(
            num_cpus=2,
            num_gpus=1,
            resources={GPU_MEMORY_RESOURCE: big_card_mb},
            node_ip_address=LOOPBACK,
        )
        b = cluster.add_node(
            num_cpus=2,
            num_gpus=2,
            resources={GPU_MEMORY_RESOURCE: 2 * small_card_mb},
            node_ip_address=LOOPBACK,
        )
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    assert not ray.is_initialized()
    return cluster, FakeCluster(
        address=cluster.address,
        head=cluster.head_node.node_id,
        gpu_a=a.node_id,
        gpu_b=b.node_id,
        big_card_mb=big_card_mb,
        small_card_mb=small_card_mb,
    )


@pytest.fixture
def fake_gpu_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Starts the cluster sized by `start(big, small)`; the driver attaches via RAY_ADDRESS."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        ray.shutdown()
    # Ray rewrites a loopback address to this host's network address before connecting;
    # keep the driver (and so every server it talks to) on loopback.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    started: list[Any] = []

    def start(big_card_mb: int, small_card_mb: int) -> FakeCluster:
        cluster, fake = start_cluster(big_card_mb, small_card_mb)
        started.append(cluster)
        monkeypatch.setenv("RAY_ADDRESS", fake.address)
        return fake

    try:
        yield start
    finally:
        ray.shutdown()
        for cluster in started:
            cluster.shutdown()


def test_heterogeneous_gpu_budget_and_requests() -> None:
    """Fast check of the placement math the cluster test exercises: the budget is the largest
    card, a GPU share is of the smallest card the trial fits on, too-small nodes are excluded."""
    from model.dnn import build_dnn
    from model.memory import estimate_training_memory

    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 1, "memory": 8 << 30}},
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2, "GPU": 1, "gpu_memory_mb": 4000}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2, "GPU": 2, "gpu_memory_mb": 6000}},
    ]
    budget = budget_from_nodes(nodes)
    assert budget.kind == "gpu" and budget.bytes_per_worker == 4000 * MIB
    assert dict(budget.gpu_nodes) == {"a": 4000 * MIB, "b": 3000 * MIB}

    model = build_dnn(DNNConfig(hidden_units=(16,)))
    estimated = estimate_training_memory(model, 32)

    def cluster(b_card: int) -> WorkerBudget:  # A: one card of 4x the estimate; B: two cards
        return budget_from_nodes(
            [
                {"NodeID": "a", "Resources": {"GPU": 1, "gpu_memory_mb": 4 * estimated / MIB}},
                {"NodeID": "b", "Resources": {"GPU": 2, "gpu_memory_mb": 2 * b_card / MIB}},
            ]
        )

    # Fits both: the share is of B's smaller card (never more than its share of either card).
    both = place(model, 32, "adam", cluster(2 * estimated), 1.0)
    assert both.status == "fits" and both.label_selector == {}
    assert both.resources["GPU"] == pytest.approx(0.5, abs=0.011)
    # B's cards are too small, though both together hold it: share of A's card, B excluded.
    only_a = place(model, 32, "adam", cluster(estimated * 2 // 3), 1.0)
    assert only_a.status == "fits"
    assert only_a.resources["GPU"] == pytest.approx(0.25, abs=0.011)
    assert only_a.label_selector == {NODE_ID_LABEL: "!in(b)"}
    for placed in (both, only_a):
        assert placed.resources[GPU_MEMORY_RESOURCE] == math.ceil(estimated / MIB)
        assert placed.gpu_memory_limit_mb >= estimated / MIB
    # Declared sizes overridden by worker_memory_gb: one size for every card, no selector.
    override = budget_from_nodes(nodes, worker_memory_gb=1.0)
    assert override.gpu_nodes == () and override.bytes_per_worker == 1 << 30


@pytest.mark.infra
def test_search_places_by_per_gpu_memory_on_a_mixed_gpu_cluster(
    tmp_path: Path,
    tracking: MlflowClient,
    fake_gpu_cluster: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jobs.tracking import MLflowTrialLogger

    settings = search_settings(tmp_path, write_fer_csv(tmp_path / "fer.csv"))
    big_card, small_card = card_sizes(settings)
    cluster = fake_gpu_cluster(big_card, small_card)

    # Spy on Tune's own view: which trials held their resources when each trial started.
    running_at_start: dict[str, set[str]] = {}
    original = MLflowTrialLogger.on_trial_start

    def spy(self: Any, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running_at_start[trial.trial_id] = {
            t.trial_id for t in trials if t is not trial and t.status == "RUNNING"
        }
        original(self, iteration, trials, trial, **info)

    monkeypatch.setattr(MLflowTrialLogger, "on_trial_start", spy)

    result = run_search(settings, Strategy.fixed(PLANS))

    parent = tracking.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    space = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/search/space.json")
    )
    placement = {e["plan"]["name"]: e["placement"] for e in space["plans"]}
    children = child_runs(tracking, result.parent_run_id)
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {plan.name for plan in PLANS}
    trained = {name: run for name, run in by_name.items() if name != "huge"}

    # 3. What fits no card is refused up front and never launched; the others all finish.
    assert list(result.refused) == ["huge"]
    huge = by_name["huge"]
    assert huge.data.tags[layout.TAG_STATUS] == "does_not_fit"
    assert "fer.refusal" in huge.data.tags
    assert layout.TAG_TRIAL_ID not in huge.data.tags and "fer.node_id" not in huge.data.tags
    for name, run in trained.items():
        assert run.info.status == "FINISHED", (name, run.data.tags.get("fer.error"))
        assert run.data.tags[layout.TAG_STATUS] == "finished", name
    assert len(running_at_start) == len(trained)  # Tune started exactly the four

    # 1. Each trial ran on a GPU worker with one card that holds what it asked for; `large`
    # only fits A's card, and B (whose two cards hold more in total) was excluded for it.
    nodes = {name: run.data.tags["fer.node_id"] for name, run in trained.items()}
    for name, run in trained.items():
        asked = placement[name]["resources"]
        assert 0 < asked["GPU"] < 1, (name, asked)
        assert nodes[name] in {cluster.gpu_a, cluster.gpu_b}, (name, nodes[name])
        assert cluster.card_mb(nodes[name]) >= asked[GPU_MEMORY_RESOURCE], (name, asked)
        assert run.data.tags["fer.gpu_ids"] in {"0", "1"}
    assert cluster.head not in nodes.values()
    assert nodes["large"] == cluster.gpu_a
    assert placement["large"]["label_selector"] == {NODE_ID_LABEL: f"!in({cluster.gpu_b})"}
    assert all(placement[name]["label_selector"] == {} for name in SMALL)

    # 2. Packing: two trials held A's one GPU at the same time (one started while Tune had the
    # other RUNNING, its fractional GPU still reserved). Forced, whatever order Ray places them
    # in: the four trials need all four worker CPUs (2 on A, 2 on B) and `large` runs on A only,
    # so A runs two at once. With whole-GPU requests A could run only one at a time.
    trial_ids = {name: run.data.tags[layout.TAG_TRIAL_ID] for name, run in trained.items()}
    on_a = [name for name in trained if nodes[name] == cluster.gpu_a]
    shared = [
        (first, second)
        for first in on_a
        for second in on_a
        if trial_ids[first] in running_at_start[trial_ids[second]]
    ]
    assert shared, (nodes, running_at_start)
    for first, second in shared:
        pair = [placement[first]["resources"], placement[second]["resources"]]
        assert sum(r["GPU"] for r in pair) <= 1
        assert sum(r[GPU_MEMORY_RESOURCE] for r in pair) <= big_card
        assert trained[first].data.tags["fer.gpu_ids"] == "0"
        assert trained[second].data.tags["fer.gpu_ids"] == "0"
