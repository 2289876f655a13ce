// The update controller's layer-normalised LSTM step, fused: one pass per block of eight
// parameter elements computes the preprocessed inputs, the gate pre-activations, both layer
// norms, the gates and the new hidden and cell states, with the elements in SIMD lanes so
// every step is a vertical vector operation (GCC vector extensions; the compiler picks the
// instruction set of the machine that builds it). Forward only: it serves adaptation without
// autograd; meta-training differentiates the reference (model/controllers.py), which this
// matches to float rounding (tests/test_fused_cell.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

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

struct Tensors {
  const float* weight;      // [K, 6 + H, 4H]
  const float* bias;        // [K, 4H]
  const float* out_weight;  // [K, H, 2]
  const float* out_bias;    // [K, 2]
};

// One block of `count` <= 8 consecutive elements of one parameter tensor of one scenario.
template <int H>
void block(int count, const float* grad, const float* theta, float pre_loss0, float pre_loss1,
           const float* hidden, const float* cell, const float* weight, const float* bias,
           const float* out_weight, const float* out_bias, float p, float* alpha, float* beta,
           float* hidden_out, float* cell_out) {
  constexpr int gates = 4 * H, inputs = kInputs + H;
  const float tiny = std::exp(-p), big = std::exp(p);
  alignas(32) float x[inputs][kLanes];
  alignas(32) float cell_in[H][kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int e = l < count ? l : 0;  // lanes past the tensor's end repeat its first element
    const float values[2] = {grad[e], theta[e]};
    for (int j = 0; j < 2; ++j) {
      const float magnitude = std::fabs(values[j]);
      const bool large = magnitude >= tiny;
      x[2 * j][l] = large ? std::log(magnitude) / p : -1.0f;
      x[2 * j + 1][l] =
          large ? static_cast<float>((values[j] > 0) - (values[j] < 0)) : big * values[j];
    }
    x[4][l] = pre_loss0;
    x[5][l] = pre_loss1;
    for (int k = 0; k < H; ++k) {
      x[kInputs + k][l] = hidden[e * H + k];
      cell_in[k][l] = cell[e * H + k];
    }
  }
  // Gate pre-activations, eight columns at a time held in registers.
  Vec g[gates];
  for (int column = 0; column < gates; column += 8) {
    Vec a0 = splat(0), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int i = 0; i < inputs; ++i) {
      const Vec xi = load(x[i]);
      const float* w = weight + i * gates + column;
      a0 += xi * w[0]; a1 += xi * w[1]; a2 += xi * w[2]; a3 += xi * w[3];
      a4 += xi * w[4]; a5 += xi * w[5]; a6 += xi * w[6]; a7 += xi * w[7];
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
  const Vec rstd = vrsqrt(var * splat(1.0f / gates) + splat(1e-5f));
  // Gate order (as in torch's chunk(4)): input, forget, candidate, output.
  for (int o = 0; o < gates; ++o) {
    const Vec z = g[o] * rstd + splat(bias[o]);
    g[o] = (o >= 2 * H && o < 3 * H) ? vtanh(z) : vsigmoid(z);
  }
  Vec c[H];
  Vec cell_mean = splat(0);
  for (int k = 0; k < H; ++k) {
    c[k] = g[H + k] * load(cell_in[k]) + g[k] * g[2 * H + k];
    cell_mean += c[k];
  }
  cell_mean *= splat(1.0f / H);
  Vec cell_var = splat(0);
  Vec centred[H];
  for (int k = 0; k < H; ++k) {
    centred[k] = c[k] - cell_mean;
    cell_var += centred[k] * centred[k];
  }
  const Vec cell_rstd = vrsqrt(cell_var * splat(1.0f / H) + splat(1e-5f));
  Vec logit0 = splat(out_bias[0]), logit1 = splat(out_bias[1]);
  alignas(32) float h[H][kLanes];
  alignas(32) float c_out[H][kLanes];
  for (int k = 0; k < H; ++k) {
    const Vec hk = g[3 * H + k] * vtanh(centred[k] * cell_rstd);
    logit0 += hk * splat(out_weight[2 * k]);
    logit1 += hk * splat(out_weight[2 * k + 1]);
    store(h[k], hk);
    store(c_out[k], c[k]);
  }
  alignas(32) float a[kLanes], b[kLanes];
  store(a, vsigmoid(logit0));
  store(b, vsigmoid(logit1));
  for (int l = 0; l < count; ++l) {
    alpha[l] = a[l];
    beta[l] = b[l];
    for (int k = 0; k < H; ++k) {
      hidden_out[l * H + k] = h[k][l];
      cell_out[l * H + k] = c_out[k][l];
    }
  }
}

template <int H>
void run(const torch::Tensor& grad, const torch::Tensor& theta, const torch::Tensor& pre_loss,
         const torch::Tensor& hidden, const torch::Tensor& cell, const Tensors& w,
         const std::vector<int64_t>& offsets, double p, torch::Tensor& alpha,
         torch::Tensor& beta, torch::Tensor& hidden_out, torch::Tensor& cell_out) {
  const int64_t scenarios = grad.size(0), n = grad.size(1);
  const int64_t num_tensors = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<int64_t> starts, tensor_of;
  for (int64_t k = 0; k < num_tensors; ++k) {
    for (int64_t e = offsets[k]; e < offsets[k + 1]; e += kLanes) {
      starts.push_back(e);
      tensor_of.push_back(k);
    }
  }
  const int64_t blocks = static_cast<int64_t>(starts.size());
  const float* pl = pre_loss.data_ptr<float>();
  const float *g = grad.data_ptr<float>(), *t = theta.data_ptr<float>();
  const float *hs = hidden.data_ptr<float>(), *cs = cell.data_ptr<float>();
  float *a = alpha.data_ptr<float>(), *b = beta.data_ptr<float>();
  float *ho = hidden_out.data_ptr<float>(), *co = cell_out.data_ptr<float>();
  constexpr int gates = 4 * H, inputs = kInputs + H;
  at::parallel_for(0, scenarios * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / blocks, j = job % blocks, k = tensor_of[j];
      const int64_t e = s * n + starts[j];
      const int count = static_cast<int>(std::min<int64_t>(kLanes, offsets[k + 1] - starts[j]));
      block<H>(count, g + e, t + e, pl[2 * s], pl[2 * s + 1], hs + e * H, cs + e * H,
               w.weight + k * inputs * gates, w.bias + k * gates, w.out_weight + k * H * 2,
               w.out_bias + k * 2, static_cast<float>(p), a + e, b + e, ho + e * H,
               co + e * H);
    }
  });
}

}  // namespace

// grad, theta [S, n]; pre_loss [S, 2]; hidden, cell [S, n, H]; weight [K, 6 + H, 4H];
// bias [K, 4H]; out_weight [K, H, 2]; out_bias [K, 2]; offsets: K + 1 segment bounds.
// Returns alpha, beta [S, n] and the new hidden, cell [S, n, H].
std::vector<torch::Tensor> update_gates(torch::Tensor grad, torch::Tensor theta,
                                        torch::Tensor pre_loss, torch::Tensor hidden,
                                        torch::Tensor cell, torch::Tensor weight,
                                        torch::Tensor bias, torch::Tensor out_weight,
                                        torch::Tensor out_bias, std::vector<int64_t> offsets,
                                        double p) {
  for (const auto* tensor : {&grad, &theta, &pre_loss, &hidden, &cell, &weight, &bias,
                             &out_weight, &out_bias}) {
    TORCH_CHECK(tensor->device().is_cpu() && tensor->scalar_type() == torch::kFloat32 &&
                    tensor->is_contiguous(),
                "fused update cell: every tensor must be contiguous float32 on the CPU");
  }
  const int64_t hidden_size = hidden.size(2);
  TORCH_CHECK(offsets.size() == static_cast<size_t>(weight.size(0)) + 1 &&
                  offsets.back() == grad.size(1),
              "fused update cell: offsets do not match the parameter tensors");
  auto alpha = torch::empty_like(grad), beta = torch::empty_like(grad);
  auto hidden_out = torch::empty_like(hidden), cell_out = torch::empty_like(cell);
  const Tensors w{weight.data_ptr<float>(), bias.data_ptr<float>(),
                  out_weight.data_ptr<float>(), out_bias.data_ptr<float>()};
  switch (hidden_size) {
    case 8:
      run<8>(grad, theta, pre_loss, hidden, cell, w, offsets, p, alpha, beta, hidden_out, cell_out);
      break;
    case 16:
      run<16>(grad, theta, pre_loss, hidden, cell, w, offsets, p, alpha, beta, hidden_out,
              cell_out);
      break;
    case 32:
      run<32>(grad, theta, pre_loss, hidden, cell, w, offsets, p, alpha, beta, hidden_out,
              cell_out);
      break;
    default:
      TORCH_CHECK(false, "fused update cell: hidden size ", hidden_size, " is not built");
  }
  return {alpha, beta, hidden_out, cell_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("update_gates", &update_gates, "fused update-controller step (forward)");
}
