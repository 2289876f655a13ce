"""Redis with a password and with TLS, on a redis-server of the test's own: the store works
with the right password, and with none or a wrong one every call is a StoreError (the service
answers 503) whose text never holds the password; a rediss:// connection verifies the
server's certificate against the configured CA file."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisProcess, free_port, needs_redis, running
from problem_checks import assert_problem, urn
from pydantic import SecretStr, ValidationError

from service.errors import StoreError
from service.settings import Settings
from service.store import RedisStore, ScenarioState, open_store

pytestmark = [pytest.mark.anyio, needs_redis]
PASSWORD = "s3cret-redis-password-for-the-test"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: the server's and its CA."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *request, "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def server(tmp_path_factory, certificate) -> Iterator[tuple[RedisProcess, int]]:
    """One redis-server with a password, on a plain port and a TLS port; the TLS port."""
    cert, key = certificate
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    process = RedisProcess(
        tmp_path_factory.mktemp("redis"),
        *tls,
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    process.start()  # RedisProcess waits for an unauthenticated PING: set the password after
    with redis.Redis(port=process.port) as client:
        client.config_set("requirepass", PASSWORD)
    yield process, tls_port
    process.stop()


def state() -> ScenarioState:
    meta = {"meta_learner": "v0001"}
    return ScenarioState(meta=meta, params=b"p", candidates=["a"], interactions=[], popularity=[])


async def every_call(store: RedisStore) -> None:
    """Each store call once, the way the service makes them."""
    await store.ping()
    revision = await store.put("auth", state())
    assert revision is not None
    assert await store.revision("auth") == revision
    assert (await store.get("auth")) is not None
    assert (await store.get_meta("auth")) is not None
    assert [row["scenario"] for row in await store.list_meta(None, 10)] == ["auth"]
    token = await store.acquire_lock("auth", 5)
    assert token is not None
    await store.release_lock("auth", token)
    await store.publish({"type": "test"})
    assert await store.delete("auth") is True


async def test_the_right_password_opens_the_store(server, tmp_path):
    process, _ = server
    settings = Settings(registry=tmp_path, redis_url=process.url, redis_password=PASSWORD)
    store = open_store(
        settings.redis_url, "auth-ok", password=settings.redis_password, tls_ca_file=None
    )
    assert isinstance(store, RedisStore)
    try:
        await every_call(store)
    finally:
        await store.close()


@pytest.mark.parametrize("password", [None, "wrong-password"], ids=["none", "wrong"])
async def test_without_the_password_every_call_is_a_store_error(server, password):
    process, _ = server
    secret = None if password is None else SecretStr(password)
    store = RedisStore(process.url, "auth-no", 2.0, password=secret)
    calls = {
        "ping": store.ping(),
        "put": store.put("x", state()),
        "revision": store.revision("x"),
        "get": store.get("x"),
        "get_meta": store.get_meta("x"),
        "list_meta": store.list_meta(None, 10),
        "delete": store.delete("x"),
        "acquire_lock": store.acquire_lock("x", 5),
        "release_lock": store.release_lock("x", "t"),
        "publish": store.publish({"type": "test"}),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(StoreError) as raised:
                await call
            text = str(raised.value)
            assert PASSWORD not in text and (password is None or password not in text), name
        with pytest.raises(StoreError):
            async for _ in store.events():
                pass
    finally:
        await store.close()


async def test_the_service_with_the_password_adapts_and_serves(server, registry, scenario):
    process, _ = server
    settings = Settings(registry=registry, redis_url=process.url, redis_password=PASSWORD)
    async with running(settings) as (_, client):
        adapted = await client.post("/scenarios/auth/adapt", json=scenario.body())
        assert adapted.status_code == 200, adapted.text
        params = {"user": scenario.eval_user, "scenario": "auth"}
        served = await client.get("/recommend", params=params)
        assert served.status_code == 200 and served.json()["source"] == "adapted"
        assert (await client.delete("/scenarios/auth")).status_code == 204


async def test_the_service_answers_503_with_a_wrong_password_and_never_shows_it(
    server, registry, scenario, caplog
):
    process, _ = server
    wrong = "wrong-password-that-must-not-leak"
    settings = Settings(
        registry=registry, redis_url=process.url, redis_password=wrong, redis_timeout_s=1.0
    )
    assert wrong not in repr(settings) and wrong not in str(settings.model_dump())
    async with running(settings) as (_, client):
        for request in (
            client.get("/scenarios/x"),
            client.get("/scenarios"),
            client.post("/scenarios/x/adapt", json=scenario.body()),
        ):
            response = await request
            assert_problem(response, 503, urn("store-unavailable"), "store")
            assert wrong not in response.text and PASSWORD not in response.text
    assert wrong not in caplog.text and PASSWORD not in caplog.text


async def test_rediss_verifies_the_server_against_the_ca_file(server, certificate, tmp_path):
    _, tls_port = server
    cert, _ = certificate
    url = f"rediss://127.0.0.1:{tls_port}/0"
    settings = Settings(
        registry=tmp_path, redis_url=url, redis_password=PASSWORD, redis_tls_ca_file=cert
    )
    store = open_store(
        settings.redis_url,
        "auth-tls",
        password=settings.redis_password,
        tls_ca_file=settings.redis_tls_ca_file,
    )
    try:
        await every_call(store)
    finally:
        await store.close()
    # Without the CA, the self-signed certificate is not trusted: no connection.
    untrusted = RedisStore(url, "auth-tls", 2.0, password=SecretStr(PASSWORD))
    try:
        with pytest.raises(StoreError, match="certificate"):
            await untrusted.ping()
    finally:
        await untrusted.close()


def test_settings_read_the_password_and_the_ca_file_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("S2META_REDIS_URL", "rediss://redis.example:6380/0")
    monkeypatch.setenv("S2META_REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("S2META_REDIS_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    settings = Settings()
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)
    assert settings.redis_tls_ca_file == tmp_path / "ca.pem"
    monkeypatch.setenv("S2META_REDIS_PASSWORD", "")  # empty: unset, as the other secrets
    monkeypatch.setenv("S2META_REDIS_TLS_CA_FILE", "")
    settings = Settings()
    assert settings.redis_password is None and settings.redis_tls_ca_file is None
    # A CA file is for TLS: with a plain URL it would be silently unused.
    monkeypatch.setenv("S2META_REDIS_URL", "redis://redis.example:6379/0")
    monkeypatch.setenv("S2META_REDIS_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    with pytest.raises(ValidationError, match="rediss://"):
        Settings()
