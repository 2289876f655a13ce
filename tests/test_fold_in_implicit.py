"""model/fold_in.py's solve equals implicit's `recalculate_item` / `recalculate_user` for one
row (implicit is in the train extra: skipped without it, so the service tests run alone)."""

import numpy as np
import pytest
import torch

from model.fold_in import FoldInSettings, fold_in, gram

sp = pytest.importorskip("scipy.sparse")
threadpoolctl = pytest.importorskip("threadpoolctl")
als = pytest.importorskip("implicit.cpu.als")


@pytest.mark.parametrize("side", ["item", "user"])
def test_fold_in_equals_implicit_recalculate(side):
    rng = np.random.default_rng(0)
    users, items = 60, 40
    user_items = sp.random(users, items, density=0.15, random_state=1, format="csr")
    user_items.data[:] = 1.0
    with threadpoolctl.threadpool_limits(1, "blas"):  # as meta_training/embeddings.py fits it
        model = als.AlternatingLeastSquares(
            factors=8, regularization=0.1, alpha=15.0, iterations=3, random_state=0
        )
        model.fit(user_items.astype(np.float32), show_progress=False)
    fixed = model.user_factors if side == "item" else model.item_factors  # [N, 8]
    picked = rng.choice(len(fixed), size=6, replace=False)
    row = sp.csr_matrix(
        (np.ones(6, dtype=np.float32), (np.zeros(6, dtype=int), picked)), shape=(1, len(fixed))
    )
    recalculate = model.recalculate_item if side == "item" else model.recalculate_user
    expected = recalculate(0, row)
    table = torch.as_tensor(np.asarray(fixed))
    got = fold_in(gram(table), [table[picked]], FoldInSettings(0.1, 15.0, defaulted=False))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-3, atol=1e-4)
