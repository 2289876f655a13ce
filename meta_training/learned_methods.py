"""Methods that meta-train on the benchmark: s2Meta, its variants and its ablations.

- `s2meta_interaction` / `s2meta_mapping` / `s2meta_hybrid`: the Complete learner with each
  recommender variant.
- `s2meta`: Complete with the variant that scores best on meta-valid Recall@20.
- ablations of that variant: `randinit` (initial parameters stay random), `fixedlr` (plain
  SGD steps, learning rate `sgd_lr`), `fixedstep` (always `max_steps` steps), and `maml`
  (learned initialisation, plain SGD, fixed steps).
"""

import json

import numpy as np

from meta_training.episodes import support_input
from meta_training.meta_train import TrainedLearner, meta_train, tables_of
from meta_training.methods import MethodContext, MethodFactory, Scorer
from meta_training.protocol import EvaluationTask
from model.scenario import adapt_scenarios, score_scenario

VARIANT_METHODS = {
    "s2meta_interaction": "interaction",
    "s2meta_mapping": "mapping",
    "s2meta_hybrid": "hybrid",
}
# Changes to MetaTrainConfig, as MetaTrainConfig.with_changes takes them.
ABLATIONS: dict[str, dict[str, object]] = {
    "randinit": {"learn_init": False},
    "fixedlr": {"learner": {"update_rule": "sgd"}},
    "fixedstep": {"learner": {"stop_rule": "max_steps"}},
    "maml": {"learner": {"update_rule": "sgd", "stop_rule": "max_steps"}},
}


def trained(context: MethodContext, **changes: object) -> TrainedLearner:
    """Meta-train once per configuration within an evaluation run."""
    config = context.training.with_changes(**changes)
    key = "learner:" + json.dumps(config.model_dump(), sort_keys=True)
    if key not in context.memo:
        context.memo[key] = meta_train(
            context.benchmark, context.embeddings, config, seed=context.benchmark.seed
        )
    return context.memo[key]


def chosen_variant(context: MethodContext) -> str:
    """The variant with the best meta-valid Recall@20 (Complete learner)."""
    scores = {
        variant: trained(context, variant=variant).best_valid_recall
        for variant in VARIANT_METHODS.values()
    }
    return max(scores, key=scores.__getitem__)


def learner_scorer(context: MethodContext, learner: TrainedLearner) -> Scorer:
    """Adapt each scenario from its support set (seeded by scenario), then score its pool."""
    benchmark = context.benchmark
    tables = tables_of(context.embeddings)

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        scenario = support_input(benchmark, task)
        result = adapt_scenarios(learner.meta, learner.learner, tables, [scenario], benchmark.seed)
        scores = score_scenario(learner.learner, result.theta[0], tables, scenario, users)
        return scores.cpu().numpy()  # the scores are on the tables' device

    return score


def _variant_method(variant: str) -> MethodFactory:
    def factory(context: MethodContext) -> Scorer:
        return learner_scorer(context, trained(context, variant=variant))

    return factory


def _s2meta(context: MethodContext) -> Scorer:
    return learner_scorer(context, trained(context, variant=chosen_variant(context)))


def _ablation(changes: dict[str, object]) -> MethodFactory:
    def factory(context: MethodContext) -> Scorer:
        return learner_scorer(context, trained(context, variant=chosen_variant(context), **changes))

    return factory


LEARNED: dict[str, MethodFactory] = {
    "s2meta": _s2meta,
    **{name: _variant_method(variant) for name, variant in VARIANT_METHODS.items()},
    **{name: _ablation(changes) for name, changes in ABLATIONS.items()},
}
