"""The prepared benchmark is cached under a fingerprint of inputs and settings."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.prepare import prepare

EMBEDDING = EmbeddingConfig(dim=8, iterations=3)


@pytest.fixture
def lastfm_copy(tmp_path) -> Path:
    for name in ("LastFM.txt", "LastFM_item2attributes.json"):
        shutil.copy(DATA / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return tmp_path / "LastFM"


def test_second_prepare_loads_the_same_benchmark_from_cache(lastfm_copy, tmp_path):
    cache = tmp_path / "cache"
    built = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    loaded = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    assert not built.from_cache and loaded.from_cache
    assert built.cache_dir == loaded.cache_dir
    a, b = built.benchmark, loaded.benchmark
    np.testing.assert_array_equal(a.visible, b.visible)
    for split in ("valid", "test"):
        for x, y in zip(getattr(a, split), getattr(b, split), strict=True):
            assert x.scenario_id == y.scenario_id
            np.testing.assert_array_equal(x.pool, y.pool)
            np.testing.assert_array_equal(x.support_rows, y.support_rows)
            np.testing.assert_array_equal(x.eval_rows, y.eval_rows)
    for x, y in zip(a.train, b.train, strict=True):
        np.testing.assert_array_equal(x.rows, y.rows)
    np.testing.assert_array_equal(built.embeddings.item, loaded.embeddings.item)
    np.testing.assert_array_equal(built.embeddings.user_known, loaded.embeddings.user_known)
    assert a.summary() == b.summary()


def test_changed_settings_or_seed_rebuild(lastfm_copy, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    other_protocol = prepare(lastfm_copy, 0, ProtocolConfig(support_size=32), EMBEDDING, cache)
    other_embedding = prepare(lastfm_copy, 0, ProtocolConfig(), EmbeddingConfig(dim=4), cache)
    other_seed = prepare(lastfm_copy, 1, ProtocolConfig(), EMBEDDING, cache)
    for result in (other_protocol, other_embedding, other_seed):
        assert not result.from_cache
        assert result.cache_dir != first.cache_dir
    assert len(other_protocol.benchmark.test[0].support_rows) == 32


def test_edited_input_rebuilds(lastfm_copy, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    sequence = lastfm_copy.parent / "LastFM.txt"
    lines = sequence.read_text().splitlines()
    sequence.write_text("\n".join(lines[:-1]) + "\n")  # drop the last user
    second = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    assert not second.from_cache and second.cache_dir != first.cache_dir
    assert second.benchmark.data.num_users == first.benchmark.data.num_users - 1


def test_an_unfinished_cache_directory_is_rebuilt(lastfm_copy, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    (first.cache_dir / "manifest.json").unlink()  # as if a crash hit before completion
    again = prepare(lastfm_copy, 0, ProtocolConfig(), EMBEDDING, cache)
    assert not again.from_cache
    assert (again.cache_dir / "manifest.json").is_file()
    assert [p.name for p in cache.iterdir()] == [first.cache_dir.name]  # no staging left
