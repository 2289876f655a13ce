"""Pretraining sees exactly the visible interactions, and says who has no embedding."""

import dataclasses

import numpy as np
import pytest
from conftest import DATA

from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.dataset import load_dataset
from meta_training.embeddings import pretrain_embeddings
from meta_training.protocol import build_benchmark

CONFIG = EmbeddingConfig(dim=16, iterations=5)


@pytest.fixture(scope="module")
def benchmark():
    return build_benchmark(load_dataset(DATA / "LastFM"), ProtocolConfig(), seed=0)


def test_hidden_interactions_do_not_influence_the_embeddings(benchmark):
    """Deleting every hidden row from the data gives the very same embeddings, so no held-out
    interaction can have reached pretraining."""
    data = benchmark.data
    embeddings = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=0)
    keep = benchmark.visible
    stripped = dataclasses.replace(data, users=data.users[keep], items=data.items[keep])
    alone = pretrain_embeddings(stripped, np.ones(keep.sum(), dtype=bool), CONFIG, seed=0)
    np.testing.assert_array_equal(embeddings.user, alone.user)
    np.testing.assert_array_equal(embeddings.item, alone.item)


def test_the_mask_matters(benchmark):
    data = benchmark.data
    masked = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=0)
    everything = pretrain_embeddings(data, np.ones_like(benchmark.visible), CONFIG, seed=0)
    assert not np.allclose(masked.item, everything.item)


def test_no_visible_interaction_means_zero_vector_and_unknown(benchmark):
    data = benchmark.data
    embeddings = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=0)
    visible_items = np.bincount(data.items[benchmark.visible], minlength=data.num_items) > 0
    visible_users = np.bincount(data.users[benchmark.visible], minlength=data.num_users) > 0
    assert (~visible_items).sum() > 0  # LastFM hides enough to produce some
    np.testing.assert_array_equal(embeddings.item_known, visible_items)
    np.testing.assert_array_equal(embeddings.user_known, visible_users)
    assert not embeddings.item[~visible_items].any()
    assert (np.abs(embeddings.item[visible_items]).sum(axis=1) > 0).all()
    assert embeddings.user.shape == (data.num_users, 16)


def test_pretraining_is_seeded(benchmark):
    data = benchmark.data
    a = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=4)
    b = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=4)
    c = pretrain_embeddings(data, benchmark.visible, CONFIG, seed=5)
    np.testing.assert_array_equal(a.user, b.user)
    assert not np.allclose(a.user, c.user)
