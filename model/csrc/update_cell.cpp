// The update controller's layer-normalised LSTM step, fused: one pass per block of eight
// parameter elements computes the preprocessed inputs, the gate pre-activations, both layer
// norms, the gates and the new hidden and cell states, with the elements in SIMD lanes so
// every step is a vertical vector operation (GCC vector extensions; the compiler picks the
// instruction set it is told the machine has). The backward pass recomputes a block's forward
// and returns the gradients of the controller's weights given those of alpha and beta (the
// only outputs the first-order meta-gradient reaches: the recurrent states and the inputs are
// constants). Both match the reference (model/controllers.py) to float rounding
// (tests/test_fused_cell.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 8;
constexpr int kInputs = 6;  // pre(grad), pre(param), pre(loss): two values each
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int IntVec __attribute__((vector_size(kLanes * sizeof(int))));

inline Vec splat(float a) { return Vec{a, a, a, a, a, a, a, a}; }
inline Vec load(const float* p) { Vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline float lane_sum(Vec v) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// exp(x): x = m ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes expf polynomial, 2^m put
// into the exponent bits. Relative error about 1e-7 over the clamped range.
inline Vec vexp(Vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const Vec rounded = x * splat(1.44269504088896341f) + (x >= 0 ? splat(0.5f) : splat(-0.5f));
  const IntVec m = __builtin_convertvector(rounded, IntVec);
  const Vec mf = __builtin_convertvector(m, Vec);
  const Vec r = x - mf * splat(0.693359375f) + mf * splat(2.12194440e-4f);
  Vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const IntVec bits = (m + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline Vec vsigmoid(Vec x) { return splat(1.0f) / (splat(1.0f) + vexp(-x)); }
inline Vec vtanh(Vec x) { return splat(2.0f) * vsigmoid(splat(2.0f) * x) - splat(1.0f); }

inline Vec vrsqrt(Vec x) {
  Vec r;
  for (int l = 0; l < kLanes; ++l) r[l] = 1.0f / std::sqrt(x[l]);
  return r;
}

// One parameter tensor's controller weights.
struct Weights {
  const float* weight;      // [6 + H, 4H]
  const float* bias;        // [4H]
  const float* out_weight;  // [H, 2]
  const float* out_bias;    // [2]
};

// Where one block reads and writes: `count` <= 8 consecutive elements of one parameter tensor
// of one scenario.
struct Block {
  int count;
  const float* grad;
  const float* theta;
  float pre_loss0, pre_loss1;
  const float* hidden;  // [count, H]
  const float* cell;    // [count, H]
};

// A block's forward pass, keeping what the backward pass needs.
template <int H>
struct Step {
  static constexpr int gates = 4 * H, inputs = kInputs + H;
  alignas(32) float x[inputs][kLanes];
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

  void run(const Block& in, const Weights& w, float p) {
    const float tiny = std::exp(-p), big = std::exp(p);
    for (int l = 0; l < kLanes; ++l) {
      const int e = l < in.count ? l : 0;  // lanes past the tensor's end repeat its first
      const float values[2] = {in.grad[e], in.theta[e]};
      for (int j = 0; j < 2; ++j) {
        const float magnitude = std::fabs(values[j]);
        const bool large = magnitude >= tiny;
        x[2 * j][l] = large ? std::log(magnitude) / p : -1.0f;
        x[2 * j + 1][l] =
            large ? static_cast<float>((values[j] > 0) - (values[j] < 0)) : big * values[j];
      }
      x[4][l] = in.pre_loss0;
      x[5][l] = in.pre_loss1;
      for (int k = 0; k < H; ++k) {
        x[kInputs + k][l] = in.hidden[e * H + k];
        cell_in[k][l] = in.cell[e * H + k];
      }
    }
    // Gate pre-activations, eight columns at a time held in registers.
    Vec* g = normed;
    for (int column = 0; column < gates; column += 8) {
      Vec a0 = splat(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int i = 0; i < inputs; ++i) {
        const Vec xi = load(x[i]);
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

// Per-lane sums of one parameter tensor's weight gradients.
template <int H>
struct GradSums {
  static constexpr int gates = 4 * H, inputs = kInputs + H;
  Vec weight[inputs][gates];
  Vec bias[gates];
  Vec out_weight[H][2];
  Vec out_bias[2];
};

// Adds a block's contribution to the weight gradients, given d alpha and d beta of its lanes
// (zero past the tensor's end).
template <int H>
void backward_block(const Step<H>& s, const Weights& w, Vec d_alpha, Vec d_beta,
                    GradSums<H>& sums) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
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
  for (int o = 0; o < gates; ++o) d_z[o] = s.rstd * (d_z[o] - gate_mean1 - s.normed[o] * gate_mean2);
  for (int i = 0; i < inputs; ++i) {
    const Vec xi = load(s.x[i]);
    for (int o = 0; o < gates; ++o) sums.weight[i][o] += xi * d_z[o];
  }
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
  const float *grad, *theta, *pre_loss, *hidden, *cell;
  const float *weight, *bias, *out_weight, *out_bias;
  int64_t n;
};

template <int H>
Weights weights_of(const Inputs& in, int64_t k) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
  return {in.weight + k * inputs * gates, in.bias + k * gates, in.out_weight + k * H * 2,
          in.out_bias + k * 2};
}

template <int H>
Block block_of(const Inputs& in, const Blocks& blocks, const std::vector<int64_t>& offsets,
               int64_t s, int64_t j) {
  const int64_t k = blocks.tensor_of[j], e = s * in.n + blocks.starts[j];
  const int count = static_cast<int>(std::min<int64_t>(kLanes, offsets[k + 1] - blocks.starts[j]));
  return {count, in.grad + e, in.theta + e, in.pre_loss[2 * s], in.pre_loss[2 * s + 1],
          in.hidden + e * H, in.cell + e * H};
}

template <int H>
void forward(const Inputs& in, const std::vector<int64_t>& offsets, int64_t scenarios, float p,
             float* alpha, float* beta, float* hidden_out, float* cell_out) {
  const Blocks blocks(offsets);
  at::parallel_for(0, scenarios * blocks.size(), 64, [&](int64_t begin, int64_t end) {
    Step<H> step;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / blocks.size(), j = job % blocks.size();
      const Block block = block_of<H>(in, blocks, offsets, s, j);
      step.run(block, weights_of<H>(in, blocks.tensor_of[j]), p);
      const int64_t e = s * in.n + blocks.starts[j];
      for (int l = 0; l < block.count; ++l) {
        alpha[e + l] = step.alpha[l];
        beta[e + l] = step.beta[l];
        for (int k = 0; k < H; ++k) {
          hidden_out[(e + l) * H + k] = step.hidden[k][l];
          cell_out[(e + l) * H + k] = step.cell[k][l];
        }
      }
    }
  });
}

template <int H>
void backward(const Inputs& in, const std::vector<int64_t>& offsets, int64_t scenarios, float p,
              const float* d_alpha, const float* d_beta, float* d_weight, float* d_bias,
              float* d_out_weight, float* d_out_bias) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
  const Blocks blocks(offsets);
  const int64_t num_tensors = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t jobs = scenarios * blocks.size();
  // One set of per-lane sums per worker, added up at the end (no shared writes).
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), jobs));
  std::vector<std::vector<GradSums<H>>> partial(workers);
  at::parallel_for(0, workers, 1, [&](int64_t first_worker, int64_t last_worker) {
    for (int64_t worker = first_worker; worker < last_worker; ++worker) {
      auto& sums = partial[worker];
      sums.resize(num_tensors);
      std::memset(static_cast<void*>(sums.data()), 0, sums.size() * sizeof(GradSums<H>));
      Step<H> step;
      for (int64_t job = jobs * worker / workers; job < jobs * (worker + 1) / workers; ++job) {
        const int64_t s = job / blocks.size(), j = job % blocks.size(), k = blocks.tensor_of[j];
        const Block block = block_of<H>(in, blocks, offsets, s, j);
        const Weights w = weights_of<H>(in, k);
        step.run(block, w, p);
        const int64_t e = s * in.n + blocks.starts[j];
        Vec da = splat(0), db = splat(0);
        for (int l = 0; l < block.count; ++l) {
          da[l] = d_alpha[e + l];
          db[l] = d_beta[e + l];
        }
        backward_block<H>(step, w, da, db, sums[k]);
      }
    }
  });
  for (int64_t k = 0; k < num_tensors; ++k) {
    for (const auto& sums_of_worker : partial) {
      const GradSums<H>& sums = sums_of_worker[k];
      for (int i = 0; i < inputs; ++i)
        for (int o = 0; o < gates; ++o) d_weight[(k * inputs + i) * gates + o] += lane_sum(sums.weight[i][o]);
      for (int o = 0; o < gates; ++o) d_bias[k * gates + o] += lane_sum(sums.bias[o]);
      for (int h = 0; h < H; ++h)
        for (int c = 0; c < 2; ++c) d_out_weight[(k * H + h) * 2 + c] += lane_sum(sums.out_weight[h][c]);
      for (int c = 0; c < 2; ++c) d_out_bias[k * 2 + c] += lane_sum(sums.out_bias[c]);
    }
  }
}

void check(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& offsets,
           const torch::Tensor& grad, const torch::Tensor& weight) {
  for (const auto& tensor : tensors) {
    TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32 &&
                    tensor.is_contiguous(),
                "fused update cell: every tensor must be contiguous float32 on the CPU");
  }
  TORCH_CHECK(offsets.size() == static_cast<size_t>(weight.size(0)) + 1 &&
                  offsets.front() == 0 && offsets.back() == grad.size(1),
              "fused update cell: offsets do not match the parameter tensors");
}

Inputs inputs_of(const torch::Tensor& grad, const torch::Tensor& theta,
                 const torch::Tensor& pre_loss, const torch::Tensor& hidden,
                 const torch::Tensor& cell, const torch::Tensor& weight,
                 const torch::Tensor& bias, const torch::Tensor& out_weight,
                 const torch::Tensor& out_bias) {
  return {grad.data_ptr<float>(),     theta.data_ptr<float>(), pre_loss.data_ptr<float>(),
          hidden.data_ptr<float>(),   cell.data_ptr<float>(),  weight.data_ptr<float>(),
          bias.data_ptr<float>(),     out_weight.data_ptr<float>(),
          out_bias.data_ptr<float>(), grad.size(1)};
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

// grad, theta [S, n]; pre_loss [S, 2]; hidden, cell [S, n, H]; weight [K, 6 + H, 4H];
// bias [K, 4H]; out_weight [K, H, 2]; out_bias [K, 2]; offsets: the K + 1 tensor bounds.
// Returns alpha, beta [S, n] and the new hidden, cell [S, n, H].
std::vector<torch::Tensor> update_gates(torch::Tensor grad, torch::Tensor theta,
                                        torch::Tensor pre_loss, torch::Tensor hidden,
                                        torch::Tensor cell, torch::Tensor weight,
                                        torch::Tensor bias, torch::Tensor out_weight,
                                        torch::Tensor out_bias, std::vector<int64_t> offsets,
                                        double p) {
  check({grad, theta, pre_loss, hidden, cell, weight, bias, out_weight, out_bias}, offsets, grad,
        weight);
  auto alpha = torch::empty_like(grad), beta = torch::empty_like(grad);
  auto hidden_out = torch::empty_like(hidden), cell_out = torch::empty_like(cell);
  const Inputs in = inputs_of(grad, theta, pre_loss, hidden, cell, weight, bias, out_weight, out_bias);
  dispatch_hidden(hidden.size(2), [&]<int H>() {
    forward<H>(in, offsets, grad.size(0), static_cast<float>(p), alpha.data_ptr<float>(),
               beta.data_ptr<float>(), hidden_out.data_ptr<float>(), cell_out.data_ptr<float>());
  });
  return {alpha, beta, hidden_out, cell_out};
}

// The same inputs and d alpha, d beta [S, n]; returns the gradients of weight, bias,
// out_weight and out_bias.
std::vector<torch::Tensor> update_gates_backward(
    torch::Tensor grad, torch::Tensor theta, torch::Tensor pre_loss, torch::Tensor hidden,
    torch::Tensor cell, torch::Tensor weight, torch::Tensor bias, torch::Tensor out_weight,
    torch::Tensor out_bias, std::vector<int64_t> offsets, double p, torch::Tensor d_alpha,
    torch::Tensor d_beta) {
  check({grad, theta, pre_loss, hidden, cell, weight, bias, out_weight, out_bias, d_alpha, d_beta},
        offsets, grad, weight);
  auto d_weight = torch::zeros_like(weight), d_bias = torch::zeros_like(bias);
  auto d_out_weight = torch::zeros_like(out_weight), d_out_bias = torch::zeros_like(out_bias);
  const Inputs in = inputs_of(grad, theta, pre_loss, hidden, cell, weight, bias, out_weight, out_bias);
  dispatch_hidden(hidden.size(2), [&]<int H>() {
    backward<H>(in, offsets, grad.size(0), static_cast<float>(p), d_alpha.data_ptr<float>(),
                d_beta.data_ptr<float>(), d_weight.data_ptr<float>(), d_bias.data_ptr<float>(),
                d_out_weight.data_ptr<float>(), d_out_bias.data_ptr<float>());
  });
  return {d_weight, d_bias, d_out_weight, d_out_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("update_gates", &update_gates, "fused update-controller step");
  module.def("update_gates_backward", &update_gates_backward,
             "gradients of the update controller's weights through one fused step");
}
