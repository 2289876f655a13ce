// The update controller's layer-normalised LSTM step, fused: one pass per block of parameter
// elements (one SIMD register's lanes: sixteen with AVX-512, else eight) computes the
// preprocessed inputs, the gate pre-activations, both layer norms, the gates and the new
// hidden and cell states, with the elements in the lanes so every step is a vertical vector
// operation (GCC vector extensions; the compiler picks the instruction set it is told the
// machine has). The recurrent states are kept lane-major, [scenario, block, H, lane], so a
// block reads and writes them as whole registers. The backward pass recomputes a block's
// forward and returns the gradients of the controller's weights given those of alpha and beta
// (the only outputs the first-order meta-gradient reaches: the recurrent states and the
// inputs are constants). Both match the reference (model/controllers.py) to float rounding
// (tests/test_fused_cell.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "rank_pools.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
constexpr int kInputs = 6;  // pre(grad), pre(param), pre(loss): two values each
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int IntVec __attribute__((vector_size(kLanes * sizeof(int))));

inline Vec splat(float a) { return a - Vec{}; }
inline Vec load(const float* p) { Vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// The first `count` lanes from p, the rest zero (a block at the end of a parameter tensor).
inline Vec load_part(const float* p, int count) {
  if (count == kLanes) return load(p);
  Vec v = splat(0.0f);
  for (int l = 0; l < count; ++l) v[l] = p[l];
  return v;
}
inline void store_part(float* p, Vec v, int count) {
  if (count == kLanes) return store(p, v);
  for (int l = 0; l < count; ++l) p[l] = v[l];
}
inline float lane_sum(Vec v) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += v[l];
  return total;
}
inline Vec as_float(IntVec bits) { Vec v; std::memcpy(&v, &bits, sizeof v); return v; }
inline IntVec as_int(Vec v) { IntVec bits; std::memcpy(&bits, &v, sizeof bits); return bits; }

// exp(r) for |r| <= ln2 / 2: the Cephes expf polynomial, relative error about 1e-7.
inline Vec exp_reduced(Vec r) {
  Vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  return p * r * r + r + splat(1.0f);
}

#if defined(__AVX512F__)
// exp(x) = 2^m exp(r), x = m ln2 + r: AVX-512 rounds m in one instruction and applies 2^m
// with vscalefps, which saturates to 0 or infinity out of range (no clamps, no integer
// conversion): a third fewer instructions than the portable version below, and exp is most
// of the cell's nonlinear work.
inline Vec vexp(Vec x) {
  const Vec m = (Vec)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec r = x - m * splat(0.693359375f) + m * splat(2.12194440e-4f);
  return (Vec)_mm512_scalef_ps((__m512)exp_reduced(r), (__m512)m);
}
#else
// exp(x) = 2^m exp(r), x = m ln2 + r, 2^m put into the exponent bits. Relative error about
// 1e-7 over the clamped range.
inline Vec vexp(Vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const Vec rounded = x * splat(1.44269504088896341f) + (x >= 0 ? splat(0.5f) : splat(-0.5f));
  const IntVec m = __builtin_convertvector(rounded, IntVec);
  const Vec mf = __builtin_convertvector(m, Vec);
  const Vec r = x - mf * splat(0.693359375f) + mf * splat(2.12194440e-4f);
  return exp_reduced(r) * as_float((m + 127) << 23);
}
#endif

// log(x) for normal x > 0: x = f 2^e with f in [sqrt(1/2), sqrt(2)), log(f) by the Cephes
// logf polynomial in f - 1. Relative error about 1e-7.
inline Vec vlog(Vec x) {
  const IntVec bits = as_int(x);
  Vec e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, Vec);
  Vec f = as_float((bits & 0x007fffff) | 0x3f000000);  // in [1/2, 1)
  const auto below = f < splat(0.707106781186547524f);
  e = below ? e - splat(1.0f) : e;
  f = below ? f + f - splat(1.0f) : f - splat(1.0f);
  const Vec z = f * f;
  Vec y = splat(7.0376836292e-2f);
  y = y * f - splat(1.1514610310e-1f);
  y = y * f + splat(1.1676998740e-1f);
  y = y * f - splat(1.2420140846e-1f);
  y = y * f + splat(1.4249322787e-1f);
  y = y * f - splat(1.6668057665e-1f);
  y = y * f + splat(2.0000714765e-1f);
  y = y * f - splat(2.4999993993e-1f);
  y = y * f + splat(3.3333331174e-1f);
  y = y * f * z + e * splat(-2.12194440e-4f) - splat(0.5f) * z;
  return f + y + e * splat(0.693359375f);
}

// The lower clamp keeps exp(-x) finite (fast-math reciprocals do not expect infinity).
inline Vec vsigmoid(Vec x) {
  x = x < splat(-80.0f) ? splat(-80.0f) : x;
  return splat(1.0f) / (splat(1.0f) + vexp(-x));
}
inline Vec vtanh(Vec x) { return splat(2.0f) * vsigmoid(splat(2.0f) * x) - splat(1.0f); }

inline Vec vrsqrt(Vec x) {
  Vec r;
  for (int l = 0; l < kLanes; ++l) r[l] = 1.0f / std::sqrt(x[l]);
  return r;
}

// pre(x) = (log|x| / p, sgn x) if |x| >= e^-p else (-1, e^p x), lane by lane.
inline void preprocess(Vec x, float p, Vec& log_part, Vec& sign_part) {
  const float tiny = std::exp(-p);
  const Vec magnitude = x < 0 ? -x : x;
  const auto large = magnitude >= splat(tiny);
  log_part = large ? vlog(large ? magnitude : splat(tiny)) * splat(1.0f / p) : splat(-1.0f);
  const Vec sign = x > 0 ? splat(1.0f) : (x < 0 ? splat(-1.0f) : splat(0.0f));
  sign_part = large ? sign : x * splat(std::exp(p));
}

// The same for one value (the loss).
inline void preprocess_scalar(float x, float p, float& log_part, float& sign_part) {
  const float magnitude = std::fabs(x);
  const bool large = magnitude >= std::exp(-p);
  log_part = large ? std::log(magnitude) / p : -1.0f;
  sign_part = large ? static_cast<float>((x > 0) - (x < 0)) : std::exp(p) * x;
}

// One parameter tensor's controller weights.
struct Weights {
  const float* weight;      // [6 + H, 4H]
  const float* bias;        // [4H]
  const float* out_weight;  // [H, 2]
  const float* out_bias;    // [2]
};

// Where one block reads: `count` <= kLanes consecutive elements of one parameter tensor of
// one scenario, and their recurrent states (lane-major, [H, kLanes]).
struct Block {
  int count;
  const float* grad;
  const float* theta;
  float pre_loss0, pre_loss1;
  const float* hidden;
  const float* cell;
};

// The preprocessed loss is one value per scenario, so its share of the gate pre-activations,
// pre(loss) @ weight[4:6], is one row per (scenario, tensor): computed once there rather than
// in every lane of every block.
template <int H>
struct LossTerm {
  float values[4 * H];
  int64_t scenario = -1, tensor = -1;

  const float* of(const Block& block, const Weights& w, int64_t s, int64_t k) {
    if (s != scenario || k != tensor) {
      for (int o = 0; o < 4 * H; ++o)
        values[o] = block.pre_loss0 * w.weight[4 * 4 * H + o] +
                    block.pre_loss1 * w.weight[5 * 4 * H + o];
      scenario = s;
      tensor = k;
    }
    return values;
  }
};

// A block's forward pass, keeping what the backward pass needs.
template <int H>
struct Step {
  static constexpr int gates = 4 * H, inputs = kInputs + H;
  Vec x[inputs];
  Vec cell_in[H];
  Vec normed[gates];  // layer-normalised pre-activations, before the bias
  Vec rstd;
  Vec act[gates];     // input, forget (sigmoid), candidate (tanh), output (sigmoid)
  Vec cell[H];        // the new cell state
  Vec cell_normed[H];
  Vec cell_rstd;
  Vec cell_tanh[H];
  Vec hidden[H];
  Vec alpha, beta;

  void run(const Block& in, const Weights& w, const float* loss_term, float p) {
    preprocess(load_part(in.grad, in.count), p, x[0], x[1]);
    preprocess(load_part(in.theta, in.count), p, x[2], x[3]);
    x[4] = splat(in.pre_loss0);
    x[5] = splat(in.pre_loss1);
    for (int k = 0; k < H; ++k) {
      x[kInputs + k] = load(in.hidden + k * kLanes);
      cell_in[k] = load(in.cell + k * kLanes);
    }
    // Gate pre-activations, eight columns at a time held in registers, starting from the
    // loss's share (inputs 4 and 5).
    Vec* g = normed;
    for (int column = 0; column < gates; column += 8) {
      const float* from_loss = loss_term + column;
      Vec a0 = splat(from_loss[0]), a1 = splat(from_loss[1]), a2 = splat(from_loss[2]),
          a3 = splat(from_loss[3]), a4 = splat(from_loss[4]), a5 = splat(from_loss[5]),
          a6 = splat(from_loss[6]), a7 = splat(from_loss[7]);
      for (int i = 0; i < inputs; i = i == 3 ? kInputs : i + 1) {
        const Vec xi = x[i];
        const float* row = w.weight + i * gates + column;
        a0 += xi * row[0]; a1 += xi * row[1]; a2 += xi * row[2]; a3 += xi * row[3];
        a4 += xi * row[4]; a5 += xi * row[5]; a6 += xi * row[6]; a7 += xi * row[7];
      }
      g[column] = a0; g[column + 1] = a1; g[column + 2] = a2; g[column + 3] = a3;
      g[column + 4] = a4; g[column + 5] = a5; g[column + 6] = a6; g[column + 7] = a7;
    }
    Vec mean = splat(0);
    for (int o = 0; o < gates; ++o) mean += g[o];
    mean *= splat(1.0f / gates);
    Vec var = splat(0);
    for (int o = 0; o < gates; ++o) {
      g[o] -= mean;
      var += g[o] * g[o];
    }
    rstd = vrsqrt(var * splat(1.0f / gates) + splat(1e-5f));
    // Gate order (as torch's chunk(4)): input, forget, candidate, output.
    for (int o = 0; o < gates; ++o) {
      normed[o] = g[o] * rstd;
      const Vec z = normed[o] + splat(w.bias[o]);
      act[o] = (o >= 2 * H && o < 3 * H) ? vtanh(z) : vsigmoid(z);
    }
    Vec cell_mean = splat(0);
    for (int k = 0; k < H; ++k) {
      cell[k] = act[H + k] * cell_in[k] + act[k] * act[2 * H + k];
      cell_mean += cell[k];
    }
    cell_mean *= splat(1.0f / H);
    Vec cell_var = splat(0);
    for (int k = 0; k < H; ++k) {
      cell_normed[k] = cell[k] - cell_mean;
      cell_var += cell_normed[k] * cell_normed[k];
    }
    cell_rstd = vrsqrt(cell_var * splat(1.0f / H) + splat(1e-5f));
    Vec logit0 = splat(w.out_bias[0]), logit1 = splat(w.out_bias[1]);
    for (int k = 0; k < H; ++k) {
      cell_normed[k] *= cell_rstd;
      cell_tanh[k] = vtanh(cell_normed[k]);
      hidden[k] = act[3 * H + k] * cell_tanh[k];
      logit0 += hidden[k] * splat(w.out_weight[2 * k]);
      logit1 += hidden[k] * splat(w.out_weight[2 * k + 1]);
    }
    alpha = vsigmoid(logit0);
    beta = vsigmoid(logit1);
  }
};

// Per-lane sums of one parameter tensor's bias and output-layer gradients.
template <int H>
struct GradSums {
  Vec bias[4 * H];
  Vec out_weight[H][2];
  Vec out_bias[2];
};

// A block's backward pass, given d alpha and d beta of its lanes (zero past the tensor's
// end): adds to the per-lane sums and writes the gradient of the gate pre-activations
// (before the layer norm), lane by lane, to column `column` of `d_gates` (a row per gate,
// `stride` apart). The gate weights' gradient, inputs^T d_z over all elements, is then a
// matrix product (see `backward`).
template <int H>
void backward_block(const Step<H>& s, const Weights& w, Vec d_alpha, Vec d_beta,
                    GradSums<H>& sums, float* d_gates, int64_t stride) {
  constexpr int gates = 4 * H;
  const Vec one = splat(1.0f);
  const Vec d_logit0 = d_alpha * s.alpha * (one - s.alpha);
  const Vec d_logit1 = d_beta * s.beta * (one - s.beta);
  sums.out_bias[0] += d_logit0;
  sums.out_bias[1] += d_logit1;
  Vec d_z[gates];
  Vec d_cell_normed[H];
  Vec mean1 = splat(0), mean2 = splat(0);
  for (int k = 0; k < H; ++k) {
    sums.out_weight[k][0] += s.hidden[k] * d_logit0;
    sums.out_weight[k][1] += s.hidden[k] * d_logit1;
    const Vec d_hidden = d_logit0 * splat(w.out_weight[2 * k]) + d_logit1 * splat(w.out_weight[2 * k + 1]);
    const Vec out_gate = s.act[3 * H + k];
    d_z[3 * H + k] = d_hidden * s.cell_tanh[k] * out_gate * (one - out_gate);
    d_cell_normed[k] = d_hidden * out_gate * (one - s.cell_tanh[k] * s.cell_tanh[k]);
    mean1 += d_cell_normed[k];
    mean2 += d_cell_normed[k] * s.cell_normed[k];
  }
  mean1 *= splat(1.0f / H);
  mean2 *= splat(1.0f / H);
  for (int k = 0; k < H; ++k) {
    const Vec d_cell = s.cell_rstd * (d_cell_normed[k] - mean1 - s.cell_normed[k] * mean2);
    const Vec in_gate = s.act[k], forget_gate = s.act[H + k], candidate = s.act[2 * H + k];
    d_z[k] = d_cell * candidate * in_gate * (one - in_gate);
    d_z[H + k] = d_cell * s.cell_in[k] * forget_gate * (one - forget_gate);
    d_z[2 * H + k] = d_cell * in_gate * (one - candidate * candidate);
  }
  Vec gate_mean1 = splat(0), gate_mean2 = splat(0);
  for (int o = 0; o < gates; ++o) {
    sums.bias[o] += d_z[o];
    gate_mean1 += d_z[o];
    gate_mean2 += d_z[o] * s.normed[o];
  }
  gate_mean1 *= splat(1.0f / gates);
  gate_mean2 *= splat(1.0f / gates);
  for (int o = 0; o < gates; ++o)
    store(d_gates + o * stride, s.rstd * (d_z[o] - gate_mean1 - s.normed[o] * gate_mean2));
}

// The blocks of every scenario: block j of scenario s starts at element starts[j] of
// tensor tensor_of[j].
struct Blocks {
  std::vector<int64_t> starts, tensor_of;
  explicit Blocks(const std::vector<int64_t>& offsets) {
    for (size_t k = 0; k + 1 < offsets.size(); ++k) {
      for (int64_t e = offsets[k]; e < offsets[k + 1]; e += kLanes) {
        starts.push_back(e);
        tensor_of.push_back(static_cast<int64_t>(k));
      }
    }
  }
  int64_t size() const { return static_cast<int64_t>(starts.size()); }
};

struct Inputs {
  const float *grad, *theta, *hidden, *cell;
  std::vector<float> pre_loss;  // [S, 2]: pre(loss) of each scenario
  const float *weight, *bias, *out_weight, *out_bias;
  int64_t n;
};

template <int H>
Weights weights_of(const Inputs& in, int64_t k) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
  return {in.weight + k * inputs * gates, in.bias + k * gates, in.out_weight + k * H * 2,
          in.out_bias + k * 2};
}

// Offset of block j of scenario s in the lane-major states.
template <int H>
int64_t state_offset(const Blocks& blocks, int64_t s, int64_t j) {
  return (s * blocks.size() + j) * H * kLanes;
}

template <int H>
Block block_of(const Inputs& in, const Blocks& blocks, const std::vector<int64_t>& offsets,
               int64_t s, int64_t j) {
  const int64_t k = blocks.tensor_of[j], e = s * in.n + blocks.starts[j];
  const int count = static_cast<int>(std::min<int64_t>(kLanes, offsets[k + 1] - blocks.starts[j]));
  const int64_t state = state_offset<H>(blocks, s, j);
  return {count, in.grad + e, in.theta + e, in.pre_loss[2 * s], in.pre_loss[2 * s + 1],
          in.hidden + state, in.cell + state};
}

// The gates of the scenarios listed in `updating` (the others' are written by the caller).
template <int H>
void forward(const Inputs& in, const std::vector<int64_t>& offsets,
             const std::vector<int64_t>& updating, float p, float* alpha, float* beta,
             float* hidden_out, float* cell_out) {
  const Blocks blocks(offsets);
  const int64_t jobs = static_cast<int64_t>(updating.size()) * blocks.size();
  at::parallel_for(0, jobs, 64, [&](int64_t begin, int64_t end) {
    Step<H> step;
    LossTerm<H> loss_term;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = updating[job / blocks.size()], j = job % blocks.size();
      const int64_t k = blocks.tensor_of[j];
      const Block block = block_of<H>(in, blocks, offsets, s, j);
      const Weights w = weights_of<H>(in, k);
      step.run(block, w, loss_term.of(block, w, s, k), p);
      const int64_t e = s * in.n + blocks.starts[j];
      store_part(alpha + e, step.alpha, block.count);
      store_part(beta + e, step.beta, block.count);
      const int64_t state = state_offset<H>(blocks, s, j);
      for (int k = 0; k < H; ++k) {
        store(hidden_out + state + k * kLanes, step.hidden[k]);
        store(cell_out + state + k * kLanes, step.cell[k]);
      }
    }
  });
}

// The gate weights' gradient, the sum over elements of inputs (x) times d pre-activations
// (d_z), is a matrix product with the elements as the inner dimension. Each worker fills a
// tile of consecutive blocks of one tensor (x and d_z in columns, small enough to stay in
// cache) and adds the tile's product to its own gradient with torch's GEMM: per-lane
// accumulators for it would not fit in registers and cost a load and a store per FMA.
template <int H>
void backward(const Inputs& in, const std::vector<int64_t>& offsets, int64_t scenarios, float p,
              const float* d_alpha, const float* d_beta, torch::Tensor& d_weight,
              float* d_bias, float* d_out_weight, float* d_out_bias) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
  constexpr int64_t kTileColumns = 1024;
  const Blocks blocks(offsets);
  const int64_t num_tensors = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t jobs = scenarios * blocks.size();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), jobs));
  std::vector<std::vector<GradSums<H>>> partial(workers);
  std::vector<torch::Tensor> partial_weight(workers);
  at::parallel_for(0, workers, 1, [&](int64_t first_worker, int64_t last_worker) {
    for (int64_t worker = first_worker; worker < last_worker; ++worker) {
      auto& sums = partial[worker];
      sums.resize(num_tensors);
      std::memset(static_cast<void*>(sums.data()), 0, sums.size() * sizeof(GradSums<H>));
      auto weight_sums = torch::zeros_like(d_weight);
      auto x_tile = torch::empty({inputs, kTileColumns}, torch::kFloat32);
      auto d_tile = torch::empty({gates, kTileColumns}, torch::kFloat32);
      float* x_data = x_tile.data_ptr<float>();
      float* d_data = d_tile.data_ptr<float>();
      int64_t tile_tensor = -1, tile_columns = 0;
      auto flush = [&]() {
        if (tile_columns == 0) return;
        weight_sums[tile_tensor].addmm_(x_tile.slice(1, 0, tile_columns),
                                        d_tile.slice(1, 0, tile_columns).t());
        tile_columns = 0;
      };
      Step<H> step;
      LossTerm<H> loss_term;
      for (int64_t job = jobs * worker / workers; job < jobs * (worker + 1) / workers; ++job) {
        const int64_t s = job / blocks.size(), j = job % blocks.size(), k = blocks.tensor_of[j];
        if (k != tile_tensor || tile_columns == kTileColumns) {
          flush();
          tile_tensor = k;
        }
        const Block block = block_of<H>(in, blocks, offsets, s, j);
        const Weights w = weights_of<H>(in, k);
        step.run(block, w, loss_term.of(block, w, s, k), p);
        for (int i = 0; i < inputs; ++i) store(x_data + i * kTileColumns + tile_columns, step.x[i]);
        const int64_t e = s * in.n + blocks.starts[j];
        backward_block<H>(step, w, load_part(d_alpha + e, block.count),
                          load_part(d_beta + e, block.count), sums[k], d_data + tile_columns,
                          kTileColumns);
        tile_columns += kLanes;
      }
      flush();
      partial_weight[worker] = weight_sums;
    }
  });
  for (const auto& weight_sums : partial_weight) d_weight.add_(weight_sums);
  for (int64_t k = 0; k < num_tensors; ++k) {
    for (const auto& sums_of_worker : partial) {
      const GradSums<H>& sums = sums_of_worker[k];
      for (int o = 0; o < gates; ++o) d_bias[k * gates + o] += lane_sum(sums.bias[o]);
      for (int h = 0; h < H; ++h)
        for (int c = 0; c < 2; ++c) d_out_weight[(k * H + h) * 2 + c] += lane_sum(sums.out_weight[h][c]);
      for (int c = 0; c < 2; ++c) d_out_bias[k * 2 + c] += lane_sum(sums.out_bias[c]);
    }
  }
}

void check(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& offsets,
           const torch::Tensor& grad, const torch::Tensor& hidden, const torch::Tensor& weight) {
  for (const auto& tensor : tensors) {
    TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32 &&
                    tensor.is_contiguous(),
                "fused update cell: every tensor must be contiguous float32 on the CPU");
  }
  TORCH_CHECK(offsets.size() == static_cast<size_t>(weight.size(0)) + 1 &&
                  offsets.front() == 0 && offsets.back() == grad.size(1),
              "fused update cell: offsets do not match the parameter tensors");
  TORCH_CHECK(hidden.dim() == 4 && hidden.size(0) == grad.size(0) &&
                  hidden.size(1) == Blocks(offsets).size() && hidden.size(3) == kLanes,
              "fused update cell: states must be [scenarios, blocks, H, lanes]");
}

Inputs inputs_of(const torch::Tensor& grad, const torch::Tensor& theta,
                 const torch::Tensor& loss, const torch::Tensor& hidden,
                 const torch::Tensor& cell, const torch::Tensor& weight,
                 const torch::Tensor& bias, const torch::Tensor& out_weight,
                 const torch::Tensor& out_bias, double p) {
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == grad.size(0),
              "fused update cell: one loss per scenario");
  Inputs in{grad.data_ptr<float>(),      theta.data_ptr<float>(), hidden.data_ptr<float>(),
            cell.data_ptr<float>(),      {},                      weight.data_ptr<float>(),
            bias.data_ptr<float>(),      out_weight.data_ptr<float>(),
            out_bias.data_ptr<float>(), grad.size(1)};
  const float* losses = loss.data_ptr<float>();
  for (int64_t s = 0; s < loss.size(0); ++s) {
    float log_part, sign_part;
    preprocess_scalar(losses[s], static_cast<float>(p), log_part, sign_part);
    in.pre_loss.push_back(log_part);
    in.pre_loss.push_back(sign_part);
  }
  return in;
}

// Calls fn<H>() for the built hidden sizes.
template <typename Fn>
void dispatch_hidden(int64_t hidden_size, Fn&& fn) {
  switch (hidden_size) {
    case 8: fn.template operator()<8>(); break;
    case 16: fn.template operator()<16>(); break;
    case 32: fn.template operator()<32>(); break;
    default: TORCH_CHECK(false, "fused update cell: hidden size ", hidden_size, " is not built");
  }
}

}  // namespace

// grad, theta [S, n]; loss [S]; hidden, cell [S, B, H, lanes] (B blocks: each tensor's
// elements in runs of `lanes`); weight [K, 6 + H, 4H]; bias [K, 4H]; out_weight [K, H, 2];
// out_bias [K, 2]; offsets: the K + 1 tensor bounds; updating [S] bool: the scenarios whose
// gates are computed. Writes their new states into hidden_out, cell_out (of the states'
// shape; they may be hidden and cell themselves: a block reads its states before it writes
// them) and returns alpha, beta [S, n]. A scenario not updating (it stopped) gets zero gates
// and its states unchanged: the caller's update leaves it as it is.
std::vector<torch::Tensor> update_gates(torch::Tensor grad, torch::Tensor theta,
                                        torch::Tensor loss, torch::Tensor hidden,
                                        torch::Tensor cell, torch::Tensor weight,
                                        torch::Tensor bias, torch::Tensor out_weight,
                                        torch::Tensor out_bias, std::vector<int64_t> offsets,
                                        double p, torch::Tensor hidden_out,
                                        torch::Tensor cell_out, torch::Tensor updating) {
  check({grad, theta, loss, hidden, cell, weight, bias, out_weight, out_bias, hidden_out,
         cell_out},
        offsets, grad, hidden, weight);
  TORCH_CHECK(hidden_out.sizes() == hidden.sizes() && cell_out.sizes() == hidden.sizes() &&
                  cell.sizes() == hidden.sizes(),
              "fused update cell: the states and their outputs must have one shape");
  TORCH_CHECK(updating.device().is_cpu() && updating.scalar_type() == torch::kBool &&
                  updating.dim() == 1 && updating.size(0) == grad.size(0),
              "fused update cell: updating must be one bool per scenario");
  auto alpha = torch::empty_like(grad), beta = torch::empty_like(grad);
  const Inputs in =
      inputs_of(grad, theta, loss, hidden, cell, weight, bias, out_weight, out_bias, p);
  const auto flags = updating.contiguous();
  const bool* flag = flags.data_ptr<bool>();
  std::vector<int64_t> listed;
  for (int64_t s = 0; s < grad.size(0); ++s) {
    if (flag[s]) {
      listed.push_back(s);
      continue;
    }
    alpha[s].zero_();
    beta[s].zero_();
    if (!hidden_out.is_same(hidden)) hidden_out[s].copy_(hidden[s]);
    if (!cell_out.is_same(cell)) cell_out[s].copy_(cell[s]);
  }
  dispatch_hidden(hidden.size(2), [&]<int H>() {
    forward<H>(in, offsets, listed, static_cast<float>(p), alpha.data_ptr<float>(),
               beta.data_ptr<float>(), hidden_out.data_ptr<float>(), cell_out.data_ptr<float>());
  });
  return {alpha, beta};
}

// The same inputs and d alpha, d beta [S, n]; returns the gradients of weight, bias,
// out_weight and out_bias.
std::vector<torch::Tensor> update_gates_backward(
    torch::Tensor grad, torch::Tensor theta, torch::Tensor loss, torch::Tensor hidden,
    torch::Tensor cell, torch::Tensor weight, torch::Tensor bias, torch::Tensor out_weight,
    torch::Tensor out_bias, std::vector<int64_t> offsets, double p, torch::Tensor d_alpha,
    torch::Tensor d_beta) {
  check({grad, theta, loss, hidden, cell, weight, bias, out_weight, out_bias, d_alpha, d_beta},
        offsets, grad, hidden, weight);
  auto d_weight = torch::zeros_like(weight), d_bias = torch::zeros_like(bias);
  auto d_out_weight = torch::zeros_like(out_weight), d_out_bias = torch::zeros_like(out_bias);
  const Inputs in =
      inputs_of(grad, theta, loss, hidden, cell, weight, bias, out_weight, out_bias, p);
  dispatch_hidden(hidden.size(2), [&]<int H>() {
    backward<H>(in, offsets, grad.size(0), static_cast<float>(p), d_alpha.data_ptr<float>(),
                d_beta.data_ptr<float>(), d_weight, d_bias.data_ptr<float>(),
                d_out_weight.data_ptr<float>(), d_out_bias.data_ptr<float>());
  });
  return {d_weight, d_bias, d_out_weight, d_out_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("lanes") = kLanes;
  // Each call releases the GIL (arguments converted before, results after): an adaptation
  // or a ranking on a worker thread must not hold the event loop for its length.
  module.def("update_gates", &update_gates, "fused update-controller step",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("update_gates_backward", &update_gates_backward,
             "gradients of the update controller's weights through one fused step",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("top_k_pools", &top_k_pools, "top-k of several recommenders' pools at once",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
