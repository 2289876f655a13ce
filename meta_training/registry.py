"""Every method `s2meta evaluate` knows, by name."""

from meta_training.learned_methods import LEARNED
from meta_training.methods import BASELINES, MethodFactory
from meta_training.tuned_baselines import TUNED

METHODS: dict[str, MethodFactory] = {**BASELINES, **TUNED, **LEARNED}
