"""The client's retry rules against a scripted transport (httpx.MockTransport), with the
sleep recorded instead of slept: 429 and 503 retried, Retry-After honoured (seconds or an
HTTP date) and capped, seeded backoff otherwise, a bounded number of attempts, nothing else
retried; network errors retried where the request did not leave or repeating it is harmless.
Also what every request carries (token, request id) and the problem of a non-JSON answer."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from s2meta.client import AsyncClient, Client, ProblemError, RetryPolicy

pytestmark = pytest.mark.anyio
RECOMMENDED = {
    "user": "u",
    "scenario": "s",
    "revision": 1,
    "meta_learner": "v0001",
    "source": "adapted",
    "items": [{"item": "i", "score": 1.0}],
}
Answer = httpx.Response | Exception


class Script:
    """Answers the requests in order from `answers` (the last one repeats), recording each."""

    def __init__(self, *answers: Answer) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok() -> httpx.Response:
    return httpx.Response(200, json=RECOMMENDED)


def refused(status: int, retry_after: str | None = None) -> httpx.Response:
    body = {"type": "about:blank", "title": "No", "status": status, "detail": "not now"}
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    headers["Content-Type"] = "application/problem+json"
    return httpx.Response(status, json=body, headers=headers)


def client(script: Script, sleeps: list[float], **options: object) -> Client:
    transport = httpx.MockTransport(script)
    return Client("http://s2meta", transport=transport, sleep=sleeps.append, **options)


def recommend(c: Client) -> object:
    return c.recommend("s", "u")


def adapt(c: Client) -> object:
    return c.adapt("s", [("u", "i")], ["i", "j"])


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_honoured(status):
    script, sleeps = Script(refused(status, "2"), refused(status, "1"), ok()), []
    assert client(script, sleeps).recommend("s", "u").revision == 1
    assert (len(script.requests), sleeps) == (3, [2.0, 1.0])


def test_retry_after_http_date_honoured_and_capped():
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=20), usegmt=True)
    script, sleeps = Script(refused(503, soon), refused(503, past), refused(429, "3600"), ok()), []
    client(script, sleeps, retry=RetryPolicy(max_wait_s=60)).recommend("s", "u")
    assert 17 < sleeps[0] <= 20 and sleeps[1:] == [0.0, 60.0]


def test_backoff_without_retry_after_is_seeded_and_grows():
    policy = RetryPolicy(max_attempts=6, backoff_s=1.0, max_wait_s=5.0, seed=7)
    runs = []
    for _ in range(2):
        script, sleeps = Script(refused(503), refused(503), refused(503), refused(503), ok()), []
        client(script, sleeps, retry=policy).recommend("s", "u")
        runs.append(sleeps)
    assert runs[0] == runs[1] and len(runs[0]) == 4  # the same seed, the same waits
    assert all(0 <= wait < min(2**k, 5.0) for k, wait in enumerate(runs[0]))
    other, sleeps = Script(refused(503), ok()), []
    client(other, sleeps, retry=RetryPolicy(backoff_s=1.0, seed=8)).recommend("s", "u")
    assert sleeps != runs[0][:1]


@pytest.mark.parametrize("status", [429, 503])
def test_gives_up_after_max_attempts(status):
    script, sleeps = Script(refused(status, "1")), []
    with pytest.raises(ProblemError) as raised:
        client(script, sleeps, retry=RetryPolicy(max_attempts=3)).recommend("s", "u")
    assert (raised.value.status, raised.value.retry_after, raised.value.detail) == (
        status,
        "1",
        "not now",
    )
    assert (len(script.requests), sleeps) == (3, [1.0, 1.0])


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 412, 413, 422, 500, 502, 504])
def test_no_retry_on_other_statuses(status):
    script, sleeps = Script(refused(status, "1"), ok()), []
    with pytest.raises(ProblemError) as raised:
        client(script, sleeps).adapt("s", [("u", "i")], ["i", "j"])
    assert raised.value.status == status and (len(script.requests), sleeps) == (1, [])


def test_readiness_is_asked_once():
    script, sleeps = Script(refused(503, "1")), []
    with pytest.raises(ProblemError):
        client(script, sleeps).ready()
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("call", "error", "retried"),
    [
        (recommend, httpx.ConnectError("refused"), True),
        (adapt, httpx.ConnectError("refused"), True),  # never left: safe for a write
        (adapt, httpx.ConnectTimeout("slow"), True),
        (recommend, httpx.ReadTimeout("slow"), True),
        (recommend, httpx.RemoteProtocolError("cut"), True),
        (adapt, httpx.ReadTimeout("slow"), False),  # may have adapted: not sent again
        (adapt, httpx.RemoteProtocolError("cut"), False),
        (recommend, httpx.UnsupportedProtocol("ftp"), False),
    ],
)
def test_network_errors(call: Callable[[Client], object], error: Exception, retried: bool):
    adapted = {
        **RECOMMENDED,
        "variant": "hybrid",
        "used_interactions": 1,
        "ignored": {"unknown_users": [], "unknown_items": []},
        "num_candidates": 2,
        "duration_ms": 1.0,
        "steps": 1,
        "stopped_by": "max_steps",
        "train_loss": [1.0],
        "stop_probability": [0.1],
    }
    script, sleeps = Script(error, httpx.Response(200, json=adapted)), []
    if retried:
        call(client(script, sleeps, retry=RetryPolicy(seed=0)))
        assert len(script.requests) == 2 and len(sleeps) == 1
    else:
        with pytest.raises(type(error)):
            call(client(script, sleeps))
        assert len(script.requests) == 1


def test_network_errors_give_up_after_max_attempts():
    script, sleeps = Script(httpx.ConnectError("refused")), []
    with pytest.raises(httpx.ConnectError):
        client(script, sleeps, retry=RetryPolicy(max_attempts=2)).recommend("s", "u")
    assert len(script.requests) == 2


def test_every_request_carries_the_token_and_its_request_id():
    script, sleeps = Script(refused(429, "0"), ok()), []
    client(script, sleeps, token="t0k").recommend("s", "u", request_id="req-1")
    assert all(r.headers["Authorization"] == "Bearer t0k" for r in script.requests)
    assert [r.headers["X-Request-ID"] for r in script.requests] == ["req-1", "req-1"]
    client(script, sleeps).recommend("s", "u")
    assert "X-Request-ID" not in script.requests[-1].headers
    assert "Authorization" not in script.requests[-1].headers


def test_if_match_sends_a_revision_as_its_tag():
    script = Script(httpx.Response(204))
    c = client(script, [])
    c.delete_scenario("s", if_match=7)
    c.delete_scenario("s", if_match="*")
    c.delete_scenario("s")
    assert [r.headers.get("If-Match") for r in script.requests] == ['"7"', "*", None]


def test_a_non_json_error_keeps_its_text():
    script = Script(httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(ProblemError) as raised:
        client(script, []).recommend("s", "u")
    problem = raised.value
    assert (problem.status, problem.type, problem.title) == (502, "about:blank", "Bad Gateway")
    assert problem.detail == "<html>bad gateway</html>" and "502" in str(problem)


async def test_async_client_retries_alike():
    script, sleeps = Script(refused(429, "2"), refused(503), ok()), []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = httpx.MockTransport(script)
    policy = RetryPolicy(backoff_s=1.0, seed=3)
    async with AsyncClient("http://s", transport=transport, sleep=sleep, retry=policy) as c:
        assert (await c.recommend("s", "u", request_id="r")).revision == 1
    assert len(script.requests) == 3 and sleeps[0] == 2.0 and 0 <= sleeps[1] < 2.0
    # The sync client with the same policy waits the same.
    sync_sleeps: list[float] = []
    client(Script(refused(429, "2"), refused(503), ok()), sync_sleeps, retry=policy).recommend(
        "s", "u"
    )
    assert sync_sleeps == sleeps


@pytest.mark.parametrize("unreadable", ["soon", "-1", "1.5", "Mon, 99 Foo"])
def test_an_unreadable_retry_after_falls_back_to_the_backoff(unreadable):
    script, sleeps = Script(refused(503, unreadable), ok()), []
    client(script, sleeps, retry=RetryPolicy(backoff_s=0.25, seed=1)).recommend("s", "u")
    assert len(sleeps) == 1 and 0 <= sleeps[0] < 0.25
