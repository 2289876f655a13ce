// model/csrc/rank_pools.cpp's entry point, bound in model/csrc/update_cell.cpp's module.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

// The hybrid variant's extra terms: the item embedding table, the pool's rows in it, the
// pool's log-popularity, and the parameters dot_scale and pop_weight.
using HybridTerms = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One pool ranked for some users: users [U, D], the MLP's weights [in, out] and biases, the
// pool's half of the first layer [P, H], the hybrid terms (none for the interaction
// variant), and k.
using PoolQuery = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             at::Tensor, std::optional<HybridTerms>, int64_t>;

// Top-k (values, indices) [U, k] of each query's scores; a forward holds about chunk_pairs
// (user, item) pairs.
std::vector<std::tuple<at::Tensor, at::Tensor>> top_k_pools(const std::vector<PoolQuery>& queries,
                                                            int64_t chunk_pairs);
