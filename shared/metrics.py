"""Prometheus metrics, registered on an injected registry (tests use a fresh one).

Names are the contract with the Grafana dashboard and the alert rules in
``docker/`` and ``k8s/``: change one, change all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
E2E_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass(frozen=True)
class Metrics:
    messages: Counter
    stage_duration: Histogram
    in_progress: Gauge
    retries: Counter
    dead_letters: Counter
    end_to_end: Histogram
    recipe_duration: Histogram
    ab_outcomes: Counter
    notification_failures: Counter
    upload_retries: Counter
    publish_failures: Counter
    monitor_page_failures: Counter


def build_metrics(registry: CollectorRegistry) -> Metrics:
    """Create every preimg metric on ``registry``."""
    return Metrics(
        messages=Counter(
            "preimg_messages",
            "Messages handled, by stage, instrument and outcome "
            "(ok, replayed, failed, retried, lease_busy, dead_lettered, ignored)",
            ["stage", "instrument", "outcome"],
            registry=registry,
        ),
        stage_duration=Histogram(
            "preimg_stage_duration_seconds",
            "Time a stage's handler took for one message",
            ["stage", "instrument"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        ),
        in_progress=Gauge(
            "preimg_in_progress",
            "Messages being handled right now",
            ["stage", "instrument"],
            registry=registry,
        ),
        retries=Counter(
            "preimg_retries",
            "Messages sent to a retry queue",
            ["stage", "instrument"],
            registry=registry,
        ),
        dead_letters=Counter(
            "preimg_dead_letters",
            "Messages sent to a dead-letter queue",
            ["queue", "reason"],
            registry=registry,
        ),
        end_to_end=Histogram(
            "preimg_end_to_end_seconds",
            "Delivery received by ingest to completion event, per run",
            ["instrument", "status"],
            buckets=E2E_BUCKETS,
            registry=registry,
        ),
        recipe_duration=Histogram(
            "preimg_recipe_duration_seconds",
            "Wall time of one esorex recipe run",
            ["instrument", "recipe", "status"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        ),
        ab_outcomes=Counter(
            "preimg_abs",
            "Association Blocks processed, by final status",
            ["instrument", "status"],
            registry=registry,
        ),
        notification_failures=Counter(
            "preimg_notification_failures",
            "E-mail notifications that could not be sent",
            ["instrument"],
            registry=registry,
        ),
        upload_retries=Counter(
            "preimg_qc_upload_retries",
            "Retried uploads to the QC server",
            ["instrument"],
            registry=registry,
        ),
        publish_failures=Counter(
            "preimg_publish_failures",
            "Events the broker did not take (returned as unroutable, or nacked); the message is retried",
            ["stage", "instrument"],
            registry=registry,
        ),
        monitor_page_failures=Counter(
            "preimg_monitor_page_failures",
            "Monitor page rebuilds that failed (retried with back-off; the page shows older rows meanwhile)",
            ["instrument"],
            registry=registry,
        ),
    )
