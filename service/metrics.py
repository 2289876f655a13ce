"""Prometheus metrics, in a registry per app (so several apps can live in one process).

With several worker processes (S2META_WORKERS > 1) prometheus_client runs in multiprocess
mode: `s2meta serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start, each writes its
values there, and /metrics in any of them reads all the files: counters and histograms are
summed over the workers, each gauge is combined as its `multiprocess_mode` says, over the
workers alive.
"""

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# (version, default variant, variants comma-separated): one loaded meta learner's labels.
LearnerLabels = tuple[str, str, str]
# Where prometheus_client's multiprocess mode keeps each worker's values; set, it is on.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "s2meta_request_seconds",
            "Request latency by route and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.adaptation_seconds = Histogram(
            "s2meta_adaptation_seconds",
            "Scenario-specific learning time (one adaptation; trigger=reload: one batch), by the "
            "meta learner that adapted",
            ["trigger", "meta_learner"],
            buckets=(*LATENCY_BUCKETS, 30.0, 60.0),
            registry=self.registry,
        )
        self.adaptation_steps = Histogram(
            "s2meta_adaptation_steps",
            "Updates applied in one adaptation",
            buckets=(1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 30, 50),
            registry=self.registry,
        )
        self.stop_reasons = Counter(
            "s2meta_adaptation_stops",
            "Adaptations by stop reason",
            ["reason"],
            registry=self.registry,
        )
        self.adaptations_rejected = Counter(
            "s2meta_adaptations_rejected",
            "Adaptations refused because the queue was full",
            registry=self.registry,
        )
        self.adaptations_in_flight = Gauge(
            "s2meta_adaptations_in_flight",
            "Adaptations running or queued in this replica",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.recommend_seconds = Histogram(
            "s2meta_recommend_seconds",
            "A recommend call's time in the service (one user, or a batch call), by the meta "
            "learner of the revision served: a canary's against the current one's",
            ["meta_learner"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "s2meta_recommender_cache_hits",
            "Adapted recommender cache hits",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "s2meta_recommender_cache_misses",
            "Adapted recommender cache misses (built from the store)",
            registry=self.registry,
        )
        self.store_events_live = Gauge(
            "s2meta_store_events_live",
            "1 while the store's event subscription is live (revisions read since are trusted "
            "until announced otherwise), else 0",
            registry=self.registry,
            multiprocess_mode="livemin",  # 1 only while every worker's subscription is live
        )
        self.revision_reads = Counter(
            "s2meta_store_revision_reads",
            "Recommendations that asked the store for the scenario's current revision (the "
            "others knew it from the store's announcements)",
            registry=self.registry,
        )
        self.store_reachable = Gauge(
            "s2meta_store_reachable",
            "1 when the scenario store answered the last readiness check, else 0 (the replica "
            "is then degraded: it serves what it holds, and requests that need the store get 503)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.store_fallbacks = Counter(
            "s2meta_store_fallbacks",
            "Recommendations served from the in-process cache while the store was unreachable",
            registry=self.registry,
        )
        self.recommend_batch_size = Histogram(
            "s2meta_recommend_batch_size",
            "Recommends ranked together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.popular_fallbacks = Counter(
            "s2meta_popular_fallbacks",
            "Recommendations served from scenario popularity (user without an embedding)",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "s2meta_auth_failures",
            "Requests refused for a missing or wrong token",
            ["role", "reason"],
            registry=self.registry,
        )
        self.readapt_backlog = Gauge(
            "s2meta_readapt_backlog",
            "Scenarios still adapted by an older meta learner than the current one",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.adaptation_compiled = Gauge(
            "s2meta_adaptation_compiled",
            "1 once adaptations of this variant of the current meta learner run the compiled "
            "step (0 while it compiles in the background, or when compiling failed: the eager "
            "step serves meanwhile)",
            ["variant"],
            registry=self.registry,
            multiprocess_mode="livemin",  # 1 only when every live worker has compiled it
        )
        self.adaptation_compile_failures = Counter(
            "s2meta_adaptation_compile_failures",
            "Compiles of the adaptation step that failed, by variant (the eager step serves; "
            "the log says why)",
            ["variant"],
            registry=self.registry,
        )
        self.readaptations = Counter(
            "s2meta_readaptations",
            "Scenarios moved to the current meta learner by this replica (revision written): "
            "how=adapted, or how=reused (the record it had with that version, kept from before)",
            ["how"],
            registry=self.registry,
        )
        self.meta_learner = Gauge(
            "s2meta_meta_learner_loaded",
            "1 for the current meta learner version of this replica",
            ["version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.meta_learner_info = Gauge(
            "s2meta_meta_learner_info",
            "1 for each meta learner version loaded in this replica (the current one and older "
            "ones still serving scenarios), with its default variant and variants; 0 once "
            "unloaded",
            ["version", "default_variant", "variants"],
            registry=self.registry,
            multiprocess_mode="livemax",  # 1 while any live worker holds the version
        )
        self._version: str | None = None
        self._loaded_source: Callable[[], set[LearnerLabels]] | None = None
        self._loaded_shown: set[LearnerLabels] = set()

    def set_current_version(self, version: str) -> None:
        if self._version is not None and self._version != version:
            # Zeroed before it is dropped: in multiprocess mode the value stays in this
            # worker's file, where a dropped 1 would go on reading as loaded.
            self.meta_learner.labels(version=self._version).set(0)
            self.meta_learner.remove(self._version)
        self.meta_learner.labels(version=version).set(1)
        self._version = version
        self.show_loaded()

    def track_loaded(self, source: Callable[[], set[LearnerLabels]]) -> None:
        """Where s2meta_meta_learner_info reads the loaded versions: shown at each registry
        poll (`set_current_version`) and each scrape of this process."""
        self._loaded_source = source
        self.show_loaded()

    def show_loaded(self) -> None:
        if self._loaded_source is None:
            return
        loaded = self._loaded_source()
        for labels in self._loaded_shown - loaded:
            # Zeroed before it is dropped, as in set_current_version (multiprocess files).
            self.meta_learner_info.labels(*labels).set(0)
            self.meta_learner_info.remove(*labels)
        for labels in loaded - self._loaded_shown:
            self.meta_learner_info.labels(*labels).set(1)
        self._loaded_shown = loaded

    def exposition(self) -> bytes:
        """The text format of this process's metrics, or in multiprocess mode of all the
        workers'."""
        self.show_loaded()
        if MULTIPROC_DIR not in os.environ:
            return generate_latest(self.registry)
        workers = CollectorRegistry()
        MultiProcessCollector(workers)
        return generate_latest(workers)

    def process_exiting(self) -> None:
        """In multiprocess mode, drop this worker's gauges from the live ones."""
        if MULTIPROC_DIR in os.environ:
            mark_process_dead(os.getpid())
