"""What the sync and async clients share: the problem exception, the retry policy and its
decisions, and each route's request and answer (`Call`). The two clients differ only in how
they send and sleep."""

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# The statuses that say "not now" rather than "no": the queue is full (429), the store or
# the meta learner is unavailable (503). Nothing else is retried.
RETRY_STATUSES = frozenset({429, 503})
# Raised before the request left: safe to send again whatever the request.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server: sent again only when repeating it is harmless.
MAYBE_SENT = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem detail, as the service answers every 4xx and 5xx."""

    status: int
    type: str = "about:blank"
    title: str = ""
    detail: str | None = None
    instance: str | None = None
    errors: tuple[dict[str, Any], ...] = ()  # per-field errors of a 422


class ProblemError(Exception):
    """The service refused a request (or a proxy in front of it did). `problem` is its body;
    `request_id` the X-Request-ID the service answered with, to find it in the logs."""

    def __init__(self, problem: Problem, request_id: str | None, retry_after: str | None) -> None:
        super().__init__(f"HTTP {problem.status} {problem.title}: {problem.detail}")
        self.problem = problem
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str | None:
        return self.problem.detail

    @property
    def instance(self) -> str | None:
        return self.problem.instance

    @property
    def errors(self) -> tuple[dict[str, Any], ...]:
        return self.problem.errors


def problem_of(response: httpx.Response) -> ProblemError:
    """The exception for an error answer. A body that is not a JSON object (a proxy's HTML
    page, say) becomes the detail, so nothing the server said is lost."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:1000] or None}
    detail, errors = body.get("detail"), body.get("errors")
    problem = Problem(
        status=response.status_code,
        type=str(body.get("type", "about:blank")),
        title=str(body.get("title", response.reason_phrase)),
        detail=detail if isinstance(detail, str) or detail is None else str(detail),
        instance=body.get("instance"),
        errors=tuple(errors) if isinstance(errors, list) else (),
    )
    return ProblemError(
        problem, response.headers.get("X-Request-ID"), response.headers.get("Retry-After")
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: at most `max_attempts` sends in all. The wait is the
    server's Retry-After (seconds or an HTTP date) when it sends one, else exponential
    backoff with full jitter (a uniform draw below backoff_s * 2**retry); either is capped at
    `max_wait_s`. `seed` seeds the jitter's generator: None draws from the OS."""

    max_attempts: int = 4
    backoff_s: float = 0.5
    max_wait_s: float = 30.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or self.max_wait_s < 0:
            raise ValueError(f"invalid retry policy {self}")


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Retry-After in seconds from `now`; None when absent or unreadable (then the backoff
    decides)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is read as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class Retrying:
    """One call's retry decisions: each `after_*` returns the seconds to wait before the next
    attempt, or None to stop (answer or raise)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random, idempotent: bool) -> None:
        self.policy, self.rng, self.idempotent = policy, rng, idempotent
        self.attempts = 1

    def _wait(self, retry_after: float | None) -> float | None:
        if self.attempts >= self.policy.max_attempts:
            return None
        if retry_after is None:
            retry_after = self.rng.random() * self.policy.backoff_s * 2 ** (self.attempts - 1)
        self.attempts += 1
        return min(retry_after, self.policy.max_wait_s)

    def after_response(self, response: httpx.Response) -> float | None:
        if response.status_code not in RETRY_STATUSES:
            return None
        now = datetime.now(UTC)
        return self._wait(retry_after_s(response.headers.get("Retry-After"), now))

    def after_error(self, error: httpx.TransportError) -> float | None:
        if isinstance(error, NOT_SENT) or (self.idempotent and isinstance(error, MAYBE_SENT)):
            return self._wait(None)
        return None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One route's request, and how its successful answer becomes the returned value."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: list[tuple[str, str]] | None = None
    json: object = None
    headers: dict[str, str] = field(default_factory=dict)
    # Repeating it changes nothing: network errors after sending may retry it.
    idempotent: bool = True
    retry: bool = True  # False: one attempt whatever the answer (readiness probes)

    def request(
        self, http: httpx.Client | httpx.AsyncClient, request_id: str | None
    ) -> httpx.Request:
        headers = {**self.headers, **({"X-Request-ID": request_id} if request_id else {})}
        return http.build_request(
            self.method, self.path, params=self.params, json=self.json, headers=headers
        )

    def answer(self, response: httpx.Response) -> T:
        if not response.is_success:
            raise problem_of(response)
        return self.parse(response)


def model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate_json(response.content)


def pairs(interactions: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"user": user, "item": item} for user, item in interactions]


def if_match(tag: int | str | None) -> dict[str, str]:
    """An int is a revision (sent as its strong tag "7"); a str is sent as it is (`*`, or an
    ETag the service gave)."""
    if tag is None:
        return {}
    return {"If-Match": f'"{tag}"' if isinstance(tag, int) else tag}


def for_call(call: Call[Any], policy: RetryPolicy, rng: random.Random) -> Retrying:
    return Retrying(policy if call.retry else NO_RETRY, rng, call.idempotent)


def default_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


DEFAULT_RETRY = RetryPolicy()
