"""The service's settings: one `Settings`, read from the environment (prefix `S2META_`)."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S2META_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address of s2meta serve")
    port: int = Field(8000, ge=1, le=65535, description="port of s2meta serve")
    registry: Path = Field(
        Path("registry"), description="the meta-learner registry directory (s2meta publish)"
    )
    redis_url: str | None = Field(
        None, description="Redis URL for shared scenario state; unset or empty: in-process store"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token for the admin routes; unset: open (warned at start)"
    )
    read_token: SecretStr | None = Field(
        None, description="bearer token for the read routes (recommend, scenarios); unset: open"
    )
    redis_timeout_s: float = Field(
        2.0, gt=0, description="Redis connect and read timeout: a down store answers 503 by then"
    )
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="request bodies larger than this get 413 unread"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty: CORS off"
    )
    namespace: str = Field("s2meta", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="key prefix")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    max_interactions: int = Field(10_000, ge=1)
    max_candidates: int = Field(1_000_000, ge=2)
    min_interactions: int = Field(8, ge=1)
    adapt_seed: int = Field(0, description="the stop draws' and triples' seed when none is given")
    adapt_workers: int = Field(1, ge=1, description="adaptations running at once")
    adapt_queue: int = Field(8, ge=0, description="adaptations waiting beyond the running ones")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 429")

    cache_scenarios: int = Field(256, ge=1, description="adapted recommenders kept in process")
    workers: int = Field(
        1,
        ge=1,
        description="server processes of s2meta serve on its one port (the kernel spreads the "
        "connections); more than one needs S2META_REDIS_URL, and /metrics then covers all",
    )
    # Off by default: under load uvicorn's line per request costs a share of a recommend's CPU
    # (benchmarks/serving_load.py runs the service with it flipped and prints what it costs),
    # and every request is counted and timed by route and status in /metrics anyway.
    access_log: bool = Field(
        False, description="uvicorn's access log, a line per request (s2meta serve)"
    )
    torch_threads: int = Field(
        1,
        ge=1,
        description="torch's threads within one product (s2meta serve); parallelism comes "
        "from the event loop, the ranking batch and adaptations running side by side",
    )
    recommend_batch_max: int = Field(
        64, ge=1, description="concurrent recommends ranked together, at most (1: one by one)"
    )
    # One: a second batch ranked beside the first contends for the GIL with it and with the
    # event loop (profiled load runs: a longer tail, no more throughput); on a GPU, or with
    # large pools, more can pay.
    recommend_batches: int = Field(
        1, ge=1, description="batches of recommends ranked at once; more wait for the next"
    )
    # Without the compiled ranking kernel: about 3 ms of ranking on this project's 2-core
    # machine (0.1 µs per pair of the 64-dim hybrid variant), the longest the event loop is
    # held by it.
    recommend_inline_pairs: int = Field(
        32_768,
        ge=0,
        description="a batch of recommends scoring at most this many (user, item) pairs is "
        "ranked on the event loop, a larger one on its own thread (0: always the thread); "
        "only where the compiled ranking kernel is not available (with it, always the thread)",
    )
    # The defaults: exact below 300,000 items; above, an inverted file over 1,024 lists
    # searching 96 of them (benchmarks/retrieval_scale.py: recall@100 against exact and
    # speed-up over exact torch scoring at 10k/100k/300k/1M items).
    faiss_index: str = Field(
        "IVF1024,Flat",
        description="FAISS index factory string for mapping-variant pools of faiss_min_pool+",
    )
    faiss_search: str = Field(
        "nprobe=96",
        description="search parameters of that index, a faiss ParameterSpace string ('' none)",
    )
    faiss_min_pool: int = Field(
        300_000, ge=0, description="pools smaller than this use the exact Flat index"
    )
    reload_poll_s: float = Field(5.0, gt=0, description="registry polling interval")
    readapt_batch: int = Field(
        64, ge=1, description="stale scenarios re-adapted together after a hot reload"
    )
    readapt_lock_s: int = Field(600, ge=1, description="how long a re-adaptation lock lives")

    @field_validator("redis_url", "admin_token", "read_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value
