"""Baselines with settings tuned on meta-valid Recall@20 (never on meta-test):

- `mf_pop_blend`: a rank blend of mf_dot and itempop, weight w in a grid;
- `mf_finetune`: per scenario, score = s * <e_u, e_i> + b_i, a learned scale and a bias per
  pool item, fitted on the support interactions by hinge loss on sampled triples (Adam),
  the L2 weight on the biases and the number of steps tuned;
- `finetune`: the recommender (the training config's variant) fitted per scenario from a
  random initialisation with Adam, learning rate and steps tuned;
- `general`: one model for all scenarios (the hybrid recommender without its popularity
  term, NeuMF-style: dot product plus MLP), trained on every visible interaction with no
  scenario information, and scored on each pool.
"""

import itertools
from collections.abc import Callable

import numpy as np
import torch

from meta_training.episodes import support_input
from meta_training.meta_train import tables_of
from meta_training.methods import MethodContext, Scorer, itempop, mean_recall_at_20, mf_dot
from meta_training.protocol import EvaluationTask
from model.inner_loss import Tables
from model.recommender import RecommenderSpec, hinge_loss, init_params, score_pool
from model.sampling import pool_popularity, sample_triples
from model.scenario import scenario_rng

ScorerFactory = Callable[[dict[str, float]], Scorer]


def tune_on_valid(
    context: MethodContext, factory: ScorerFactory, grid: dict[str, list[float]]
) -> Scorer:
    """The scorer whose settings give the best mean Recall@20 on meta-valid."""
    benchmark = context.benchmark
    best_score, best_scorer = -1.0, None
    for values in itertools.product(*grid.values()):
        scorer = factory(dict(zip(grid, values, strict=True)))
        score = mean_recall_at_20(benchmark, benchmark.valid, scorer, benchmark.seed)
        if score > best_score:
            best_score, best_scorer = score, scorer
    assert best_scorer is not None
    return best_scorer


def _rank_scores(scores: np.ndarray) -> np.ndarray:
    """Ranks as scores in [0, 1] per row, 1 for the best (ties share the lower rank)."""
    ranks = scores.argsort(axis=1).argsort(axis=1)
    return ranks / max(scores.shape[1] - 1, 1)


def mf_pop_blend(context: MethodContext) -> Scorer:
    dot, pop = mf_dot(context), itempop(context)

    def factory(settings: dict[str, float]) -> Scorer:
        weight = settings["weight"]

        def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return weight * _rank_scores(dot(task, users, rng)) + (1 - weight) * _rank_scores(
                np.asarray(pop(task, users, rng))
            )

        return score

    return tune_on_valid(context, factory, {"weight": [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]})


def mf_finetune(context: MethodContext) -> Scorer:
    benchmark = context.benchmark
    tables = tables_of(context.embeddings)

    def factory(settings: dict[str, float]) -> Scorer:
        def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            scenario = support_input(benchmark, task)
            fit_rng = scenario_rng(benchmark.seed, task.scenario_id)
            steps = int(settings["steps"])
            triples = sample_triples(
                scenario.users, scenario.items, scenario.pool, (steps, 128), fit_rng
            )
            # Pool positions of the triples' items (the pool is sorted).
            pos_idx = torch.as_tensor(np.searchsorted(scenario.pool, triples.positives.numpy()))
            neg_idx = torch.as_tensor(np.searchsorted(scenario.pool, triples.negatives.numpy()))
            dot_pos = (tables.user[triples.users] * tables.item[triples.positives]).sum(-1)
            dot_neg = (tables.user[triples.users] * tables.item[triples.negatives]).sum(-1)
            scale = torch.ones((), requires_grad=True)
            bias = torch.zeros(len(scenario.pool), requires_grad=True)
            optimizer = torch.optim.Adam([scale, bias], lr=0.05)
            for t in range(steps):
                margin = scale * (dot_pos[t] - dot_neg[t]) + bias[pos_idx[t]] - bias[neg_idx[t]]
                loss = torch.relu(1 - margin).mean() + settings["reg"] * bias.square().sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                dots = (
                    tables.user[torch.as_tensor(users)]
                    @ tables.item[torch.as_tensor(scenario.pool)].T
                )
                return (scale * dots + bias).numpy()

        return score

    return tune_on_valid(context, factory, {"steps": [25, 100], "reg": [0.0, 1e-3, 1e-2]})


def finetune(context: MethodContext) -> Scorer:
    benchmark = context.benchmark
    tables = tables_of(context.embeddings)
    spec = RecommenderSpec(context.training.variant, tables.user.shape[1])

    def factory(settings: dict[str, float]) -> Scorer:
        def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            scenario = support_input(benchmark, task)
            fit_rng = scenario_rng(benchmark.seed, task.scenario_id)
            seed = int(fit_rng.integers(2**31))
            params = {
                k: v.requires_grad_(True)
                for k, v in init_params(spec, torch.Generator().manual_seed(seed)).items()
            }
            steps = int(settings["steps"])
            triples = sample_triples(
                scenario.users, scenario.items, scenario.pool, (steps, 128), fit_rng
            )
            optimizer = torch.optim.Adam(params.values(), lr=settings["lr"])
            for t in range(steps):
                loss = hinge_loss(
                    spec,
                    params,
                    tables.user[triples.users[t]],
                    tables.item[triples.positives[t]],
                    tables.item[triples.negatives[t]],
                    triples.positive_pop[t],
                    triples.negative_pop[t],
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return _pool_scores(spec, params, tables, scenario.items, scenario.pool, users)

        return score

    return tune_on_valid(context, factory, {"lr": [1e-3, 1e-2], "steps": [20, 100]})


def general(context: MethodContext) -> Scorer:
    """Trained once per seed on all visible interactions; scenarios only choose the pool."""
    benchmark = context.benchmark
    data = benchmark.data
    tables = tables_of(context.embeddings)
    spec = RecommenderSpec("hybrid", tables.user.shape[1])
    rng = np.random.default_rng([benchmark.seed, 7])
    visible = np.flatnonzero(benchmark.visible)
    all_items = np.arange(data.num_items)
    params = {
        k: v.requires_grad_(True)
        for k, v in init_params(spec, torch.Generator().manual_seed(benchmark.seed)).items()
    }
    params["pop_weight"].requires_grad_(False)  # no scenario information
    optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=1e-3)
    no_pop = torch.zeros(1024)
    for _ in range(GENERAL_STEPS):
        rows = visible[rng.integers(0, len(visible), size=1024)]
        negatives = all_items[rng.integers(0, len(all_items), size=1024)]
        loss = hinge_loss(
            spec,
            params,
            tables.user[data.users[rows]],
            tables.item[data.items[rows]],
            tables.item[negatives],
            no_pop,
            no_pop,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted = {k: v.detach() for k, v in params.items()}

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        with torch.no_grad():
            return score_pool(
                spec,
                fitted,
                tables.user[torch.as_tensor(users)],
                tables.item[torch.as_tensor(task.pool)],
                torch.zeros(len(task.pool)),
            ).numpy()

    return score


GENERAL_STEPS = 2000


def _pool_scores(
    spec: RecommenderSpec,
    params: dict[str, torch.Tensor],
    tables: Tables,
    support_items: np.ndarray,
    pool: np.ndarray,
    users: np.ndarray,
) -> np.ndarray:
    with torch.no_grad():
        return score_pool(
            spec,
            {k: v.detach() for k, v in params.items()},
            tables.user[torch.as_tensor(users)],
            tables.item[torch.as_tensor(pool)],
            torch.as_tensor(pool_popularity(support_items, pool)),
        ).numpy()


TUNED: dict[str, Callable[[MethodContext], Scorer]] = {
    "mf_pop_blend": mf_pop_blend,
    "mf_finetune": mf_finetune,
    "finetune": finetune,
    "general": general,
}
