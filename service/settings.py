"""The service's settings: one `Settings`, read from the environment (prefix `S2META_`).

Each field's description is the reference: docs/configuration.md is generated from them."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S2META_", extra="ignore")

    host: str = Field(
        "127.0.0.1", description="bind address of `s2meta serve` (`--host` overrides it)"
    )
    port: int = Field(
        8000, ge=1, le=65535, description="port of `s2meta serve` (`--port` overrides it)"
    )
    registry: Path = Field(
        Path("registry"), description="the meta-learner registry directory `s2meta publish` writes"
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL for scenario state shared by replicas (`rediss://` for TLS); "
        "unset or empty: an in-process store",
    )
    redis_password: SecretStr | None = Field(
        None,
        description="password of that Redis (its `requirepass`), sent on every connection and "
        "never logged; unset or empty: none",
    )
    redis_tls_ca_file: Path | None = Field(
        None,
        description="PEM file of the CA that signed the Redis server's certificate, for a "
        "`rediss://` URL; unset or empty: the system's CAs",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token for the admin routes (adapt, delete); unset: open, with a "
        "warning at start",
    )
    read_token: SecretStr | None = Field(
        None,
        description="bearer token for the read routes (recommend, the scenario reads); the admin "
        "token reads too; unset: open",
    )
    redis_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Redis connect and read timeout, seconds: an unreachable store answers 503 "
        "by then",
    )
    max_body_bytes: int = Field(
        64 * 2**20,
        ge=1024,
        description="request bodies larger than this get 413 before they are read",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins allowed by CORS (a JSON list); empty: CORS off",
    )
    namespace: str = Field(
        "s2meta",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Redis key prefix and event channel (`<namespace>:events`)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="torch device for adaptation and scoring; auto: `cuda` when available, "
        "else `cpu` (the same code path for both)",
    )

    max_interactions: int = Field(
        10_000, ge=1, description="most interactions an adapt request may carry (else 422)"
    )
    max_candidates: int = Field(
        1_000_000, ge=2, description="most candidates an adapt request may carry (else 422)"
    )
    min_interactions: int = Field(
        8,
        ge=1,
        description="usable interactions an adaptation needs after the users that cannot be "
        "folded in are dropped (else 422)",
    )
    adapt_seed: int = Field(
        0, description="seed of the learning's draws (triples, stop) when a request gives none"
    )
    adapt_workers: int = Field(1, ge=1, description="adaptations running at once")
    # One: a single scenario's step is too small to split over cores reliably, and the
    # recommends keep the other core (docs/performance.md).
    adapt_threads: int = Field(
        1,
        ge=0,
        description="torch's threads within an adaptation a request asks for (the adaptation "
        "workers' own setting; recommends keep S2META_TORCH_THREADS); 0: one per core",
    )
    # One: batches side by side, one per core, outrun one batch over every core, whose
    # threads all wait whenever anything else takes one of the cores (docs/performance.md).
    readapt_threads: int = Field(
        1,
        ge=0,
        description="torch's threads within a batch of re-adaptations after a hot reload; "
        "as many batches re-adapt side by side as the cores hold (cores // threads, at "
        "least one); 0: one per core",
    )
    # On: the eager step serves until the compiled one is ready (docs/performance.md).
    adapt_compile: bool = Field(
        True,
        description="compile the adaptation step in the background once a meta learner loads "
        "(about 3x faster per step on a CPU); false: adapt eagerly",
    )
    adapt_queue: int = Field(
        8, ge=0, description="adaptations waiting beyond the running ones; more get 429"
    )
    retry_after_s: int = Field(
        5,
        ge=1,
        description="the Retry-After header of a 429 (queue full) and of a 503 (store "
        "unreachable), seconds",
    )

    cache_scenarios: int = Field(256, ge=1, description="adapted recommenders kept in process")
    workers: int = Field(
        1,
        ge=1,
        description="server processes of `s2meta serve` on its one port (the kernel spreads the "
        "connections); more than one needs S2META_REDIS_URL, and /metrics then covers all",
    )
    # Off: under load a log line cost up to half a recommend's server CPU, and /metrics times
    # every request anyway (docs/performance.md).
    access_log: bool = Field(
        False, description="uvicorn's access log, a line per request (`s2meta serve`)"
    )
    torch_threads: int = Field(
        1,
        ge=1,
        description="torch's threads within one product (`s2meta serve`); parallelism comes "
        "from the event loop, the ranking batch and adaptations running side by side",
    )
    recommend_batch_max: int = Field(
        64, ge=1, description="concurrent recommends ranked together, at most (1: one by one)"
    )
    # One: a second batch only contends for the GIL with the first and the event loop
    # (docs/performance.md); on a GPU, or with large pools, more can pay.
    recommend_batches: int = Field(
        1, ge=1, description="batches of recommends ranked at once; more wait for the next"
    )
    # The default holds the event loop for about 3 ms at most (docs/performance.md).
    recommend_inline_pairs: int = Field(
        32_768,
        ge=0,
        description="a batch of recommends scoring at most this many (user, item) pairs is "
        "ranked on the event loop, a larger one on its own thread (0: always the thread); "
        "only where the compiled ranking kernel is not available (with it, always the thread)",
    )
    # Chosen from benchmarks/retrieval_scale.py's sweep (docs/benchmarks.md).
    faiss_index: str = Field(
        "IVF1024,Flat",
        description="FAISS index factory string for mapping-variant pools of at least "
        "S2META_FAISS_MIN_POOL items",
    )
    faiss_search: str = Field(
        "nprobe=96",
        description="search parameters of that index, a faiss ParameterSpace string (empty: none)",
    )
    faiss_min_pool: int = Field(
        300_000, ge=0, description="pools smaller than this use the exact `Flat` index"
    )
    reload_poll_s: float = Field(
        5.0,
        gt=0,
        description="registry polling interval, seconds (the fallback to the Redis notification)",
    )
    readapt_batch: int = Field(
        64, ge=1, description="stale scenarios re-adapted together after a hot reload"
    )
    readapt_lock_s: int = Field(
        600, ge=1, description="lifetime of a scenario's re-adaptation lock, seconds"
    )

    # Text by default: what a person reads at a terminal; json for a log pipeline
    # (docs/observability.md).
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines of `s2meta serve`, uvicorn's included: `text`, or `json` (one "
        "object per line: time, level, logger, message, request_id within a request, extra "
        "fields)",
    )
    otel_exporter: Literal["console", "otlp"] | None = Field(
        None,
        description="OpenTelemetry spans of requests, adapt, recommend, ranking and store calls: "
        "`console` (stdout) or `otlp` (OTLP over HTTP, to OTEL_EXPORTER_OTLP_ENDPOINT); needs "
        "the `otel` extra; unset: no tracing",
    )

    @field_validator(
        "redis_url",
        "redis_password",
        "redis_tls_ca_file",
        "admin_token",
        "read_token",
        "otel_exporter",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _ca_file_needs_tls(self) -> "Settings":
        # A CA file with a plain redis:// URL would be silently unused: refuse it at start.
        if self.redis_tls_ca_file is not None and not (self.redis_url or "").startswith(
            "rediss://"
        ):
            raise ValueError("S2META_REDIS_TLS_CA_FILE needs a rediss:// S2META_REDIS_URL")
        return self
