// Top-k of the interaction and hybrid variants' scores for several pools at once: the same
// products as model.recommender.score_pool (biases fused into the matrix products,
// activations in place) and the same chunking of large pools as model/ranking.py's
// reference, followed by top-k, for every (pool, users) query of a batch of recommends in one
// call. The binding releases the GIL for the whole call (model/csrc/update_cell.cpp binds
// it), so a thread ranking a batch this way runs beside the event loop instead of taking
// turns with it at every torch call.
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "rank_pools.h"

namespace {

at::Tensor score_chunk(const PoolQuery& query, const at::Tensor& user_half, int64_t start,
                       int64_t length) {
  const auto& users = std::get<0>(query);
  const auto& weights = std::get<1>(query);
  const auto& biases = std::get<2>(query);
  const auto pool_half = std::get<3>(query).narrow(0, start, length);
  auto x = (user_half.unsqueeze(1) + pool_half.unsqueeze(0)).flatten(0, 1).relu_();
  const size_t layers = weights.size();
  for (size_t layer = 1; layer < layers; ++layer) {
    x = at::addmm(biases[layer], x, weights[layer]);
    if (layer + 1 < layers) {
      x.relu_();
    }
  }
  auto scores = x.view({users.size(0), length});
  const auto& hybrid = std::get<4>(query);
  if (hybrid.has_value()) {
    // scale * <e_u, e_i> + w_pop * pop_i, added into the MLP's scores.
    const auto& [item_table, pool_rows, pool_pop, dot_scale, pop_weight] = *hybrid;
    const auto pool = at::index_select(item_table, 0, pool_rows.narrow(0, start, length));
    scores.addmm_(users * dot_scale, pool.t());
    scores.add_(pop_weight * pool_pop.narrow(0, start, length));
  }
  return scores;
}

}  // namespace

std::vector<std::tuple<at::Tensor, at::Tensor>> top_k_pools(
    const std::vector<PoolQuery>& queries, int64_t chunk_pairs) {
  c10::InferenceMode inference;
  std::vector<std::tuple<at::Tensor, at::Tensor>> tops;
  tops.reserve(queries.size());
  for (const auto& query : queries) {
    const auto& users = std::get<0>(query);
    const auto& weights = std::get<1>(query);
    const auto& biases = std::get<2>(query);
    const int64_t pool_size = std::get<3>(query).size(0);
    TORCH_CHECK(weights.size() >= 2 && weights.size() == biases.size(),
                "top_k_pools: one bias per weight, at least two layers");
    const auto user_half =
        at::addmm(biases[0], users, weights[0].narrow(0, 0, users.size(1)));
    const int64_t chunk = std::max<int64_t>(1, chunk_pairs / std::max<int64_t>(1, users.size(0)));
    at::Tensor scores;
    if (pool_size <= chunk) {
      scores = score_chunk(query, user_half, 0, pool_size);
    } else {
      std::vector<at::Tensor> parts;
      for (int64_t start = 0; start < pool_size; start += chunk) {
        parts.push_back(score_chunk(query, user_half, start, std::min(chunk, pool_size - start)));
      }
      scores = at::cat(parts, 1);
    }
    auto [values, indices] = at::topk(scores, std::get<5>(query), 1);
    tops.emplace_back(values, indices);
  }
  return tops;
}
