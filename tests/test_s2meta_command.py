"""The `s2meta` command where it needs the training stack: its help lists `serve` beside the
offline commands, and `s2meta publish --notify` announces the new version on the namespace's
event channel in the form the service's replicas act on (tests/test_hot_reload.py sends the
same)."""

import json
import time

import redis
from conftest import REDIS_URL, needs_redis

from model.artifact import PUBLISHED_EVENT, events_channel
from s2meta.cli import main


def test_help_lists_serve_beside_the_offline_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as done:
        assert done.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "train" in out and "publish" in out


def next_message(subscription: redis.client.PubSub) -> dict:
    deadline = time.monotonic() + 10
    while (message := subscription.get_message(timeout=1)) is None:
        assert time.monotonic() < deadline, "no message on the channel"
    return message


@needs_redis
def test_publish_notify_announces_the_version(artifact, tmp_path, namespace):
    with redis.Redis.from_url(REDIS_URL) as client, client.pubsub() as subscription:
        subscription.subscribe(events_channel(namespace))
        assert next_message(subscription)["type"] == "subscribe"  # listening before publishing
        registry = str(tmp_path / "registry")
        notify = ["--notify", REDIS_URL, "--namespace", namespace]
        assert main(["publish", str(artifact), "--registry", registry, *notify]) == 0
        message = next_message(subscription)
    assert message["type"] == "message"
    assert json.loads(message["data"]) == {"type": PUBLISHED_EVENT, "version": "v0001"}
