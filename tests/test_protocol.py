"""The benchmark protocol on real data: selection, splits, support/evaluation users, episode
users, and above all that nothing held out reaches pretraining, meta-training or selection."""

import numpy as np
import pytest
from conftest import DATA

from meta_training.config import ProtocolConfig, ScenarioSelection
from meta_training.dataset import InteractionData, load_dataset
from meta_training.errors import SettingsError
from meta_training.protocol import Benchmark, build_benchmark, select_scenarios
from meta_training.tasks import _evaluation_task


@pytest.fixture(scope="module")
def lastfm() -> InteractionData:
    return load_dataset(DATA / "LastFM")


@pytest.fixture(scope="module")
def beauty() -> InteractionData:
    return load_dataset(DATA / "Beauty")


@pytest.fixture(scope="module", params=["LastFM", "Beauty"])
def benchmark(request, lastfm, beauty) -> Benchmark:
    data = {"LastFM": lastfm, "Beauty": beauty}[request.param]
    return build_benchmark(data, ProtocolConfig(), seed=3)


def _mask(size: int, *row_sets: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for rows in row_sets:
        mask[rows] = True
    return mask


def _in_pool(data: InteractionData, pool: np.ndarray) -> np.ndarray:
    pool_mask = np.zeros(data.num_items, dtype=bool)
    pool_mask[pool] = True
    return pool_mask[data.items]


@pytest.mark.parametrize(
    ("stem", "expected"), [("Beauty", 68), ("Sports_and_Outdoors", 106), ("LastFM", 114)]
)
def test_selection_counts_match_the_data_readme(stem, expected):
    data = load_dataset(DATA / stem)
    assert len(select_scenarios(data, ScenarioSelection())) == expected


def test_selection_applies_pool_and_interaction_bounds(lastfm):
    selection = ScenarioSelection(min_pool_items=150, max_pool_items=400, min_interactions=900)
    counts = np.bincount(lastfm.items, minlength=lastfm.num_items)
    chosen = set(select_scenarios(lastfm, selection))
    for index, pool in enumerate(lastfm.scenario_pools):
        fits = 150 <= len(pool) <= 400 and counts[pool].sum() >= 900
        assert (index in chosen) == fits


def test_settings_leaving_no_scenario_are_an_error_naming_them(lastfm):
    selection = ScenarioSelection(min_interactions=10**9)
    with pytest.raises(SettingsError, match="min_interactions"):
        build_benchmark(lastfm, ProtocolConfig(selection=selection), seed=0)


def test_split_shares_and_disjointness(benchmark):
    splits = [benchmark.train, benchmark.valid, benchmark.test]
    ids = [{task.scenario_id for task in tasks} for tasks in splits]
    assert not benchmark.dropped  # every selected scenario of these sets yields a task
    total = sum(len(s) for s in ids)
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0]) == round(0.7 * total)
    assert len(ids[1]) == round(0.1 * total)


def test_same_seed_same_benchmark_other_seed_other_split(lastfm):
    first = build_benchmark(lastfm, ProtocolConfig(), seed=5)
    again = build_benchmark(lastfm, ProtocolConfig(), seed=5)
    other = build_benchmark(lastfm, ProtocolConfig(), seed=6)
    assert np.array_equal(first.visible, again.visible)
    for a, b in zip(first.test, again.test, strict=True):
        assert a.scenario_id == b.scenario_id
        assert np.array_equal(a.support_rows, b.support_rows)
        assert np.array_equal(a.eval_rows, b.eval_rows)
    assert [t.scenario_id for t in first.test] != [t.scenario_id for t in other.test]


def test_support_is_few_shot_from_shared_users_disjoint_from_evaluation_users(benchmark):
    data = benchmark.data
    for task in [*benchmark.valid, *benchmark.test]:
        assert len(task.support_rows) == benchmark.config.support_size
        in_pool = _in_pool(data, task.pool)
        assert in_pool[task.support_rows].all() and in_pool[task.eval_rows].all()
        support_users = set(data.users[task.support_rows].tolist())
        eval_users = set(data.users[task.eval_rows].tolist())
        assert not support_users & eval_users
        outside = np.bincount(data.users[~in_pool], minlength=data.num_users)
        assert (outside[list(support_users | eval_users)] >= 3).all()


def test_a_cut_support_user_keeps_their_earliest_interactions(benchmark):
    """Kept support rows are the user's earliest scenario rows, skipping only rows that the
    other split had claimed (and which are therefore hidden)."""
    data = benchmark.data
    cut_seen = 0
    for task in [*benchmark.valid, *benchmark.test]:
        in_pool = _in_pool(data, task.pool)
        for user in np.unique(data.users[task.support_rows]):
            kept = task.support_rows[data.users[task.support_rows] == user]
            scenario_rows = np.flatnonzero(in_pool & (data.users == user))
            # Rows are in time order within a user, so "earliest" means smallest rows.
            skipped = np.setdiff1d(scenario_rows[scenario_rows < kept.max()], kept)
            assert not benchmark.visible[skipped].any()
            cut_seen += len(kept) < len(scenario_rows)
    assert cut_seen > 0


def test_meta_valid_and_meta_test_share_no_interaction(benchmark):
    size = benchmark.data.num_interactions
    valid = _mask(
        size, *[t.support_rows for t in benchmark.valid], *[t.eval_rows for t in benchmark.valid]
    )
    for task in benchmark.test:
        assert not valid[task.support_rows].any() and not valid[task.eval_rows].any()


def test_evaluation_users_are_about_the_configured_share(lastfm):
    index = select_scenarios(lastfm, ScenarioSelection())[0]
    in_pool = _in_pool(lastfm, lastfm.scenario_pools[index])
    outside = np.bincount(lastfm.users[~in_pool], minlength=lastfm.num_users)
    scenario_users = np.unique(lastfm.users[in_pool])
    shared = scenario_users[outside[scenario_users] >= 3]
    nothing_blocked = np.zeros(lastfm.num_interactions, dtype=bool)
    for share in (0.2, 0.5):
        config = ProtocolConfig(eval_user_share=share)
        task = _evaluation_task(lastfm, index, nothing_blocked, config, 1, {})
        eval_users = np.unique(lastfm.users[task.eval_rows])
        remaining = len(shared) - len(np.unique(lastfm.users[task.support_rows]))
        assert len(eval_users) == max(1, round(share * remaining))
        assert set(eval_users.tolist()) <= set(shared.tolist())


def test_no_held_out_interaction_reaches_pretraining(benchmark):
    for task in [*benchmark.valid, *benchmark.test]:
        assert not benchmark.visible[task.support_rows].any()
        assert not benchmark.visible[task.eval_rows].any()
    for task in benchmark.train:
        assert not benchmark.visible[task.rows].any()


def test_evaluation_ground_truth_is_all_of_a_users_scenario_interactions(benchmark):
    """All of them but those the other split claimed first (hidden from everything)."""
    data = benchmark.data
    for task in [*benchmark.valid, *benchmark.test]:
        in_pool = _in_pool(data, task.pool)
        users = np.unique(data.users[task.eval_rows])
        user_mask = np.zeros(data.num_users, dtype=bool)
        user_mask[users] = True
        every = np.flatnonzero(in_pool & user_mask[data.users])
        assert set(task.eval_rows.tolist()) <= set(every.tolist())
        assert not benchmark.visible[np.setdiff1d(every, task.eval_rows)].any()


def test_other_users_scenario_interactions_stay_visible(benchmark):
    """Hiding them too would leave most pool items without an embedding."""
    data = benchmark.data
    for task in benchmark.test:
        in_pool = _in_pool(data, task.pool)
        assert benchmark.visible[in_pool].any()
        assert benchmark.visible[in_pool].sum() >= len(task.eval_rows) // 4


def test_no_meta_valid_or_test_interaction_reaches_meta_training(benchmark):
    size = benchmark.data.num_interactions
    held_out = _mask(
        size,
        *[t.support_rows for t in benchmark.valid + benchmark.test],
        *[t.eval_rows for t in benchmark.valid + benchmark.test],
    )
    for task in benchmark.train:
        assert not held_out[task.rows].any()


def test_no_meta_test_interaction_reaches_model_selection(benchmark):
    size = benchmark.data.num_interactions
    test_rows = _mask(
        size, *[t.support_rows for t in benchmark.test], *[t.eval_rows for t in benchmark.test]
    )
    for task in benchmark.valid:
        assert not test_rows[task.support_rows].any()
        assert not test_rows[task.eval_rows].any()


def test_overlapping_items_do_not_leak_into_meta_train_scenarios(lastfm):
    """LastFM's tags overlap heavily: held-out rows whose item is also in a meta-train pool
    exist, and must still be absent from that scenario's episodes."""
    benchmark = build_benchmark(lastfm, ProtocolConfig(), seed=0)
    held_out = _mask(lastfm.num_interactions, *[t.eval_rows for t in benchmark.test])
    overlapping = 0
    for task in benchmark.train:
        in_pool = _in_pool(lastfm, task.pool)
        overlapping += int((held_out & in_pool).sum())
        assert not held_out[task.rows].any()
    assert overlapping > 0


def test_episode_rows_are_whole_users_and_the_hidden_share_is_bounded(benchmark):
    data = benchmark.data
    episode = _mask(data.num_interactions, *[t.rows for t in benchmark.train])
    share = benchmark.config.episode_share
    largest_user = max(np.bincount(data.users))
    assert (
        share * data.num_interactions
        <= episode.sum()
        <= (share * data.num_interactions + largest_user)
    )
    for task in benchmark.train:
        in_pool = _in_pool(data, task.pool)
        assert in_pool[task.rows].all()
        users = np.unique(data.users[task.rows])
        assert len(users) >= 2
        user_mask = np.zeros(data.num_users, dtype=bool)
        user_mask[users] = True
        whole = np.flatnonzero(in_pool & user_mask[data.users] & ~_held_out(benchmark))
        assert np.array_equal(task.rows, whole)


def _held_out(benchmark: Benchmark) -> np.ndarray:
    """Rows claimed by meta-valid/test (support, cut remainder and evaluation)."""
    episode = _mask(benchmark.data.num_interactions, *[t.rows for t in benchmark.train])
    return ~benchmark.visible & ~episode


def test_summary_reports_hidden_shares(benchmark):
    summary = benchmark.summary()
    assert summary["episode_share"] == pytest.approx(
        _mask(benchmark.data.num_interactions, *[t.rows for t in benchmark.train]).mean()
    )
    assert summary["visible_interactions"] == int(benchmark.visible.sum())
    assert summary["scenarios"]["test"] == len(benchmark.test)
