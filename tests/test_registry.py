"""A registry's versions: stage, promote, rollback and their history, the listing, removal,
and `s2meta versions | promote | rollback | gc` with their exit codes; gc never removes the
current version, the rollback target, a staged rollout or a version a stored scenario uses."""

import asyncio
import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL, ROOT, needs_redis

from model.artifact import PUBLISHED_EVENT, current_version, events_channel, publish
from model.errors import ArtifactError
from model.history import HISTORY
from model.registry import (
    history,
    list_versions,
    promote,
    remove_version,
    rollback,
    rollback_target,
)
from s2meta.cli import main
from service.store import RedisStore, ScenarioState


@pytest.fixture(autouse=True)
def no_service_env(monkeypatch):
    for name in ("S2META_REDIS_URL", "S2META_NAMESPACE", "S2META_REGISTRY"):
        monkeypatch.delenv(name, raising=False)


def published(artifact: Path, registry: Path, count: int, stage: bool = False) -> list[str]:
    return [publish(artifact, registry, stage=stage) for _ in range(count)]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_leaves_current_and_promote_rollback_follow_the_history(artifact, registry):
    assert published(artifact, registry, 1) == ["v0002"]
    assert publish(artifact, registry, stage=True) == "v0003"
    assert current_version(registry) == "v0002"
    assert promote(registry, "v0003") == "v0003"
    assert current_version(registry) == "v0003"
    assert rollback(registry) == "v0002"
    assert rollback(registry) == "v0001"
    assert current_version(registry) == "v0001"
    actions = [line.split()[1:] for line in (registry / HISTORY).read_text().splitlines()]
    assert actions == [
        ["publish", "v0001"],
        ["publish", "v0002"],
        ["stage", "v0003"],
        ["promote", "v0003"],
        ["rollback", "v0002"],
        ["rollback", "v0001"],
    ]
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        rollback(registry)
    assert current_version(registry) == "v0001"
    # Promoting the current version changes nothing, not even the history.
    assert promote(registry, "v0001") == "v0001"
    assert len((registry / HISTORY).read_text().splitlines()) == 6


def test_rollback_skips_removed_versions_and_fails_cleanly_without_one(artifact, registry):
    published(artifact, registry, 2)  # v0002, v0003
    assert rollback_target(registry) == "v0002"
    remove_version(registry, "v0002")
    assert rollback_target(registry) == "v0001"
    assert rollback(registry) == "v0001"
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        rollback(registry)


def test_a_current_written_without_the_history_counts_as_the_last_move(artifact, registry):
    published(artifact, registry, 1)
    (registry / HISTORY).unlink()  # a registry published by older code
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        rollback(registry)
    promote(registry, "v0001")
    assert rollback(registry) == "v0002"


def test_unknown_corrupt_and_current_versions_are_refused(artifact, registry):
    with pytest.raises(ArtifactError, match="no version v0009"):
        promote(registry, "v0009")
    with pytest.raises(ArtifactError, match="not a version name"):
        promote(registry, "../v0001")
    with pytest.raises(ArtifactError, match="is current"):
        remove_version(registry, "v0001")
    publish(artifact, registry, stage=True)
    (registry / "versions" / "v0002" / "metrics.json").write_text("{}\n")
    with pytest.raises(ArtifactError, match="sha256"):
        promote(registry, "v0002")
    assert current_version(registry) == "v0001"


def test_concurrent_moves_keep_current_and_the_history_consistent(artifact, registry):
    published(artifact, registry, 3, stage=True)  # v0002..v0004

    def move(n: int) -> str:
        if n % 3 == 2:
            return publish(artifact, registry)
        return promote(registry, f"v{n % 3 + 2:04d}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(move, range(12)))
    lines = (registry / HISTORY).read_text().splitlines()
    moves = [line.split()[2] for line in lines if line.split()[1] in ("publish", "promote")]
    # Logged in the order `current` took them (the last one is current), each a real move:
    # promoting the current version logs nothing, which holds only if moves never interleave.
    assert moves[-1] == current_version(registry)
    assert all(a != b for a, b in itertools.pairwise(moves))
    assert len(history(registry)) == len(lines)
    published_versions = [line.split()[2] for line in lines if line.split()[1] == "publish"]
    assert len(set(published_versions)) == len(published_versions) == 5


def test_a_removed_version_name_is_never_reused(artifact, registry):
    published(artifact, registry, 1, stage=True)
    remove_version(registry, "v0002")
    assert not (registry / "versions" / "v0002").exists()
    assert publish(artifact, registry) == "v0003"


def test_versions_lists_dates_metrics_and_status(artifact, registry, capsys):
    published(artifact, registry, 1)
    published(artifact, registry, 1, stage=True)
    metrics_path = registry / "versions" / "v0002" / "metrics.json"
    listed = {info.version: info for info in list_versions(registry)}
    assert [(i.current, i.staged, i.rollback_target) for i in listed.values()] == [
        (False, False, True),
        (True, False, False),
        (False, True, False),
    ]
    assert listed["v0002"].metrics == {
        key: value
        for key, value in json.loads(metrics_path.read_text()).items()
        if key in ("dataset", "variant", "seed")
    }
    code, out, _ = run(capsys, "versions", "--registry", str(registry))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "PUBLISHED"]
    assert "* current" in lines[2] and "staged" in lines[3] and "rollback target" in lines[1]
    code, out, _ = run(capsys, "versions", "--registry", str(registry), "--json")
    rows = json.loads(out)
    assert [(r["version"], r["current"], r["staged"]) for r in rows] == [
        ("v0001", False, False),
        ("v0002", True, False),
        ("v0003", False, True),
    ]
    assert rows[0]["published"] <= rows[1]["published"] <= rows[2]["published"]
    assert rows[1]["metrics"]["dataset"] == "synthetic"


def test_versions_shows_recall_of_the_default_variant(artifact, tmp_path, capsys):
    registry = tmp_path / "registry"
    publish(artifact, registry)
    metrics = {"variant": "hybrid", "valid_recall@20": {"hybrid": 0.25, "mapping": 0.2}}
    (registry / "versions" / "v0001" / "metrics.json").write_text(json.dumps(metrics))
    (info,) = list_versions(registry)
    assert info.recall == 0.25
    _code, out, _ = run(capsys, "versions", "--registry", str(registry))
    assert "0.2500" in out.splitlines()[1]


def test_cli_promote_rollback_and_their_errors(artifact, registry, capsys):
    published(artifact, registry, 1, stage=True)
    code, out, _ = run(capsys, "promote", "v0002", "--registry", str(registry))
    assert (code, current_version(registry)) == (0, "v0002")
    assert "v0002 is current (was v0001)" in out and "next registry poll" in out
    code, out, _ = run(capsys, "rollback", "--registry", str(registry))
    assert (code, current_version(registry)) == (0, "v0001")
    assert "v0001 is current (rolled back from v0002)" in out
    for argv, message in (
        (["rollback"], "nothing to roll back to"),
        (["promote", "v0042"], "no version v0042"),
        (["promote", "latest"], "not a version name"),
    ):
        code, out, err = run(capsys, *argv, "--registry", str(registry))
        assert code == 2 and message in err and err.startswith("s2meta: error:"), err
    assert current_version(registry) == "v0001"
    code, _, err = run(capsys, "versions", "--registry", str(registry.parent / "nowhere"))
    assert code == 2 and "not a registry" in err
    code, _, err = run(capsys, "versions")
    assert code == 2 and "--registry" in err
    with pytest.raises(SystemExit) as exit_:
        main(["gc", "--registry", str(registry), "--keep", "0"])
    assert exit_.value.code == 2


def test_cli_refuses_invalid_settings(registry, capsys, monkeypatch):
    monkeypatch.setenv("S2META_NAMESPACE", "no spaces allowed")
    code, _, err = run(capsys, "promote", "v0001", "--registry", str(registry))
    assert code == 2 and "invalid settings" in err and "namespace" in err


def test_gc_keeps_current_rollback_target_and_staged_rollouts(artifact, registry, capsys):
    published(artifact, registry, 2)  # v0002, v0003 current; rollback target v0002
    published(artifact, registry, 1, stage=True)  # v0004: staged, older than current soon
    published(artifact, registry, 1)  # v0005 current; rollback target v0003
    published(artifact, registry, 2, stage=True)  # v0006, v0007: a rollout in progress
    code, out, _ = run(capsys, "gc", "--registry", str(registry), "--keep", "1", "--dry-run")
    assert code == 0
    assert "would remove v0001" in out and "would remove v0002" in out
    assert "would remove v0004" in out
    assert [i.version for i in list_versions(registry)] == [f"v{n:04d}" for n in range(1, 8)]
    code, out, _ = run(capsys, "gc", "--registry", str(registry), "--keep", "1")
    assert code == 0
    assert [i.version for i in list_versions(registry)] == ["v0003", "v0005", "v0006", "v0007"]
    assert "kept v0005: current" in out
    assert "kept v0003: rollback target" in out
    assert "kept v0006: staged, newer than current" in out
    assert "kept v0007: staged, newer than current, among the 1 newest" in out
    assert "removed v0001" in out and "removed v0004" in out
    code, out, _ = run(capsys, "gc", "--registry", str(registry), "--keep", "1")
    assert (code, out.splitlines()[-1]) == (0, "nothing to remove")


async def _store_scenario(namespace: str, scenario_id: str, version: str) -> None:
    store = RedisStore(REDIS_URL, namespace)
    meta = {"meta_learner": version, "variant": "hybrid", "seed": 0}
    state = ScenarioState(meta=meta, params=b"", candidates=[], interactions=[], popularity=[])
    try:
        await store.put(scenario_id, state)
    finally:
        await store.close()


@needs_redis
def test_gc_keeps_versions_stored_scenarios_use(artifact, registry, namespace, capsys, monkeypatch):
    published(artifact, registry, 4)  # v0005 current, v0004 the rollback target
    asyncio.run(_store_scenario(namespace, "old", "v0001"))
    asyncio.run(_store_scenario(namespace, "pinned", "v0002"))
    monkeypatch.setenv("S2META_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("S2META_NAMESPACE", namespace)
    code, out, _ = run(capsys, "gc", "--registry", str(registry), "--keep", "1")
    assert code == 0, out
    assert [i.version for i in list_versions(registry)] == ["v0001", "v0002", "v0004", "v0005"]
    assert "kept v0001: used by 1 stored scenario" in out
    assert "removed v0003" in out


def test_gc_refuses_when_the_store_does_not_answer(artifact, registry, capsys, monkeypatch):
    published(artifact, registry, 3)
    monkeypatch.setenv("S2META_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens
    monkeypatch.setenv("S2META_REDIS_TIMEOUT_S", "0.5")
    code, _out, err = run(capsys, "gc", "--registry", str(registry), "--keep", "1")
    assert code == 2 and "gc removes nothing" in err, err
    assert len(list_versions(registry)) == 4


@needs_redis
def test_promote_and_rollback_announce_on_redis(artifact, registry, namespace, capsys, monkeypatch):
    published(artifact, registry, 1, stage=True)
    monkeypatch.setenv("S2META_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("S2META_NAMESPACE", namespace)
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    pubsub.subscribe(events_channel(namespace))
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        for argv, version in ((["promote", "v0002"], "v0002"), (["rollback"], "v0001")):
            code, out, _ = run(capsys, *argv, "--registry", str(registry))
            assert code == 0 and "announced" in out
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None, f"no event after {argv}"
            assert json.loads(message["data"]) == {"type": PUBLISHED_EVENT, "version": version}
    finally:
        pubsub.close()
        client.close()


def test_registry_commands_need_no_training_stack(registry):
    probe = (
        "import sys; from s2meta.cli import main; "
        f"code = main(['versions', '--registry', {str(registry)!r}]); "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'meta_training']; "
        "print(bad); sys.exit(code or (1 if bad else 0))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
