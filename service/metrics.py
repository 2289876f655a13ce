"""Prometheus metrics, in a registry per app (so several apps can live in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "Scenario-specific learning time (one adaptation; trigger=reload: one batch)",
            ["trigger"],
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
        )
        self.revision_reads = Counter(
            "s2meta_store_revision_reads",
            "Recommendations that asked the store for the scenario's current revision (the "
            "others knew it from the store's announcements)",
            registry=self.registry,
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
        )
        self.readaptations = Counter(
            "s2meta_readaptations",
            "Scenarios re-adapted with a newer meta learner by this replica (revision written)",
            registry=self.registry,
        )
        self.meta_learner = Gauge(
            "s2meta_meta_learner_loaded",
            "1 for the current meta learner version of this replica",
            ["version"],
            registry=self.registry,
        )

    def set_current_version(self, version: str) -> None:
        self.meta_learner.clear()
        self.meta_learner.labels(version=version).set(1)
