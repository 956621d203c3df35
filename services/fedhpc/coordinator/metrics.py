"""The coordinator's Prometheus metrics (DESIGN.md, Observability): rounds, tasks and their
per-site phase times (queue wait included), failures by code, rejected updates, sites."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_PHASE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

ROUNDS = Counter("fedhpc_rounds_total", "Rounds aggregated (model versions produced).", ["experiment"])
TASKS_DISPATCHED = Counter("fedhpc_tasks_dispatched_total", "Trainer tasks dispatched.", ["site"])
TASKS_FAILED = Counter(
    "fedhpc_tasks_failed_total", "Trainer tasks that failed, by error code.", ["site", "code"]
)
TASK_PHASE_SECONDS = Histogram(
    "fedhpc_task_phase_seconds",
    "Time trainer tasks spent per phase (queue = batch-queue wait before the trainer started).",
    ["site", "phase"],
    buckets=_PHASE_BUCKETS,
)
UPDATES_REJECTED = Counter(
    "fedhpc_coordinator_updates_rejected_total", "Updates the aggregator rejected, by site.", ["site"]
)
AGGREGATIONS = Counter(
    "fedhpc_coordinator_aggregations_total", "Aggregate calls made, by outcome.", ["outcome"]
)
AGGREGATION_SECONDS = Histogram(
    "fedhpc_coordinator_aggregation_seconds",
    "Aggregation time as reported by the aggregator.",
    buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
EXPERIMENTS_FINISHED = Counter(
    "fedhpc_experiments_finished_total", "Experiments that ended, by state.", ["state"]
)
EXPERIMENTS_RUNNING = Gauge("fedhpc_experiments_running", "Experiments running now.")
SITES_ACTIVE = Gauge("fedhpc_sites_active", "Registered sites in the ACTIVE state.")
EXPERIMENT_ROUND = Gauge(
    "fedhpc_experiment_round", "The last round aggregated, per experiment.", ["experiment"]
)
EXPERIMENT_METRIC = Gauge(
    "fedhpc_experiment_metric",
    "Federated evaluation of the latest evaluated model (sample-weighted over sites), e.g. eval_accuracy.",
    ["experiment", "metric"],
)
ROUND_FINISHED_TIME = Gauge(
    "fedhpc_round_last_finished_timestamp_seconds",
    "When the experiment's last round was aggregated (epoch seconds); for round-stalled alerts.",
    ["experiment"],
)
UPDATE_STALENESS = Histogram(
    "fedhpc_update_staleness",
    "Staleness (versions behind) of the updates sent to aggregation.",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 50),
)
SITE_LAST_SEEN = Gauge(
    "fedhpc_site_last_seen_timestamp_seconds", "When a site last returned a result (epoch seconds).", ["site"]
)

# Every fixed series exists from the start at 0: increase() cannot see a counter's first increment.
for _outcome in ("succeeded", "failed"):
    AGGREGATIONS.labels(outcome=_outcome)
for _state in ("completed", "failed", "stopped"):
    EXPERIMENTS_FINISHED.labels(state=_state)
TASKS_IN_FLIGHT = Gauge(
    "fedhpc_tasks_in_flight", "Tasks dispatched to a site and not finished yet (queued included).", ["site"]
)
