// sapo_kernels_check.cpp - checks the host build of kernels/sapo_kernels.cu through its C ABI against plain
// double-precision loops written here from the formulas of sapo_kernels.h. One line PASS/FAIL per case; exit status
// 1 if any case failed. `sapo_kernels_check bench` times launches of the host build instead.
//
// Cases: fp32 and bf16 logits, ragged vocab (123, 1000), rows whose 16-byte alignment varies (odd row strides, an
// offset base pointer), -inf padded columns, an all -inf shard row, all-negative logits, ignored rows, targets in
// another shard, temperature 0.7, the SAPO / GRPO / no-loss epilogues (clip, dual clip, log-ratio clamp, zero
// weights over garbage), the backward out of place (with entropy, wider output stride) and in place, argument errors.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../sapo_kernels.h"

namespace {

constexpr float kNegInf = -INFINITY;
constexpr float kInvTemperature = 1.0f / 0.7f;

// bf16 as its top 16 bits of an fp32, rounded to nearest even (no NaN inputs here).
uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

float round_to(int32_t dtype, float x) { return dtype == SAPO_BF16 ? from_bf16(to_bf16(x)) : x; }

// n rows of `stride` elements in fp32 or bf16 storage, `offset` elements after a 16-byte-aligned allocation (so
// that every row may start off a 16-byte boundary). values holds what the storage holds, as floats.
struct Matrix {
  int32_t dtype;
  int64_t n, v, stride, offset;
  std::vector<float> values;
  std::vector<unsigned char> bytes;

  Matrix(int32_t dtype_, int64_t n_, int64_t v_, int64_t stride_, int64_t offset_ = 0)
      : dtype(dtype_), n(n_), v(v_), stride(stride_), offset(offset_), values(n_ * stride_, 0.0f),
        bytes((offset_ + n_ * stride_) * element_size() + 16) {}

  size_t element_size() const { return dtype == SAPO_BF16 ? 2 : 4; }
  unsigned char* base() {
    const auto address = reinterpret_cast<uintptr_t>(bytes.data());
    return bytes.data() + (16 - address % 16) % 16 + offset * element_size();
  }
  void* data() { return base(); }
  float& at(int64_t i, int64_t j) { return values[i * stride + j]; }
  // Rounds the values to the storage dtype and writes them into the storage.
  void upload() {
    for (size_t k = 0; k < values.size(); ++k) {
      values[k] = round_to(dtype, values[k]);
      if (dtype == SAPO_BF16) {
        const uint16_t h = to_bf16(values[k]);
        std::memcpy(base() + 2 * k, &h, 2);
      } else {
        std::memcpy(base() + 4 * k, &values[k], 4);
      }
    }
  }
  float stored(int64_t i, int64_t j) {
    const size_t k = i * stride + j;
    if (dtype == SAPO_BF16) {
      uint16_t h;
      std::memcpy(&h, base() + 2 * k, 2);
      return from_bf16(h);
    }
    float x;
    std::memcpy(&x, base() + 4 * k, 4);
    return x;
  }
};

// Random logits with the special rows the kernels must get right. Row kinds by i % 5: plain; -inf padded tail (the
// last 7 columns); all-negative (around -60); a few -inf scattered columns; large spread (x 8).
Matrix make_logits(int32_t dtype, int64_t n, int64_t v, int64_t stride, int64_t offset, unsigned seed) {
  Matrix m(dtype, n, v, stride, offset);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < v; ++j) {
      float x = normal(rng);
      switch (i % 5) {
        case 1: x = j >= v - 7 ? kNegInf : x; break;
        case 2: x -= 60.0f; break;
        case 3: x = j % 37 == 5 ? kNegInf : x; break;
        case 4: x *= 8.0f; break;
      }
      m.at(i, j) = x;
    }
  m.upload();
  return m;
}

// The statistics of one shard row as the header defines them, in double.
struct RefStats {
  double m, s, zexp, zexp_scale, target_z;
};

RefStats ref_stats(Matrix& x, int64_t i, int64_t target, int64_t vocab_start) {
  RefStats r{-INFINITY, 0.0, 0.0, 0.0, 0.0};
  if (target < 0) return {0.0, 1.0, 0.0, 0.0, 0.0};
  for (int64_t j = 0; j < x.v; ++j) r.m = std::fmax(r.m, double(x.at(i, j)) * kInvTemperature);
  for (int64_t j = 0; j < x.v; ++j) {
    const double z = double(x.at(i, j)) * kInvTemperature;
    if (z == -INFINITY) continue;
    const double e = std::exp(z - r.m);
    r.s += e;
    r.zexp += e * (r.m - z);
    r.zexp_scale += e * std::fabs(r.m - z);
  }
  const int64_t col = target - vocab_start;
  if (col >= 0 && col < x.v) r.target_z = double(x.at(i, col)) * kInvTemperature;
  return r;
}

double ref_lse(const RefStats& r) { return r.m + std::log(r.s); }
double ref_entropy(const RefStats& r) { return r.zexp / r.s + std::log(r.s); }

// Collects mismatches of one case; prints its PASS/FAIL line.
class Case {
 public:
  explicit Case(std::string name) : name_(std::move(name)) {}

  void expect(bool ok, const std::string& what) {
    if (!ok) fail(what);
  }
  void code(int got, int want, const char* what) {
    if (got != want) fail(std::string(what) + ": returned " + std::to_string(got) + ", expected " + std::to_string(want));
  }
  // |got - want| <= atol + rtol |want|; infinities must match exactly.
  void close(const char* what, int64_t i, double got, double want, double atol, double rtol) {
    const bool ok = std::isinf(want) ? got == want : std::fabs(got - want) <= atol + rtol * std::fabs(want);
    if (!ok) fail(std::string(what) + "[" + std::to_string(i) + "] = " + fmt(got) + ", expected " + fmt(want));
  }
  void exact(const char* what, int64_t i, double got, double want) { close(what, i, got, want, 0.0, 0.0); }

  bool report() const {
    if (failures_ == 0) {
      std::printf("PASS %s\n", name_.c_str());
    } else {
      std::printf("FAIL %s: %d mismatches, first: %s\n", name_.c_str(), failures_, first_.c_str());
    }
    return failures_ == 0;
  }

 private:
  static std::string fmt(double x) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.9g", x);
    return buf;
  }
  void fail(const std::string& what) {
    if (failures_++ == 0) first_ = what;
  }

  std::string name_, first_;
  int failures_ = 0;
};

// ---- sapo_logprob_stats ------------------------------------------------------------------------------------------

bool check_stats(const char* name, int32_t dtype, int64_t n, int64_t v, int64_t stride, int64_t offset,
                 int64_t vocab_start, std::vector<int64_t> targets, bool with_zexp, bool all_inf_row) {
  Case c(name);
  Matrix x = make_logits(dtype, n, v, stride, offset, 1234u + unsigned(v));
  if (all_inf_row) {
    for (int64_t j = 0; j < v; ++j) x.at(0, j) = kNegInf;  // row 0: this shard holds only padding
    x.upload();
  }
  std::vector<float> row_max(n, 7.0f), sumexp(n, 7.0f), zexp(n, 7.0f), target_z(n, 7.0f);
  c.code(sapo_logprob_stats(x.data(), dtype, n, v, stride, targets.data(), vocab_start, kInvTemperature,
                            row_max.data(), sumexp.data(), with_zexp ? zexp.data() : nullptr, target_z.data(),
                            nullptr),
         0, "sapo_logprob_stats");
  for (int64_t i = 0; i < n; ++i) {
    const RefStats r = ref_stats(x, i, targets[i], vocab_start);
    c.close("row_max", i, row_max[i], r.m, 0.0, 1e-6);
    c.close("row_sumexp", i, sumexp[i], r.s, 0.0, 2e-5);
    if (with_zexp) c.close("row_zexp", i, zexp[i], r.zexp, 2e-5 * r.zexp_scale, 2e-5);
    c.close("target_z", i, target_z[i], r.target_z, 0.0, 1e-6);
  }
  if (!with_zexp) c.expect(zexp == std::vector<float>(n, 7.0f), "row_zexp written although NULL was passed");
  return c.report();
}

// ---- sapo_fused_forward ------------------------------------------------------------------------------------------

struct RefLoss {
  double loss, grad;
};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

RefLoss ref_token_loss(const sapo_loss_params& p, double logp, double old_logp, double adv) {
  const double d = logp - old_logp;
  const double r = std::exp(std::fmin(std::fmax(d, -p.log_ratio_clamp), p.log_ratio_clamp));
  RefLoss out;
  if (p.loss_kind == SAPO_LOSS_SAPO) {
    const double tau = adv > 0 ? p.tau_pos : p.tau_neg, x = tau * (r - 1.0);
    out = {-sigmoid(x) * 4.0 / tau * adv, -adv * 4.0 * sigmoid(x) * sigmoid(-x) * r};
  } else {
    const double unclipped = -adv * r, clipped = -adv * std::fmin(std::fmax(r, p.ratio_low), p.ratio_high);
    out = unclipped >= clipped ? RefLoss{unclipped, -adv * r} : RefLoss{clipped, 0.0};
    if (adv < 0 && p.clip_c > 0 && out.loss > -adv * p.clip_c) out = {-adv * p.clip_c, 0.0};
  }
  if (std::fabs(d) > p.log_ratio_clamp) out.grad = 0.0;
  return out;
}

// Row i's token gets old_logp = logp - log(ratio) and the advantage of tokens[i] = (ratio, advantage). Row 2 is
// ignored; the last row has weight 0 and NaN inputs (a token outside the response mask).
bool check_fused(const char* name, int32_t dtype, int64_t v, int64_t stride, sapo_loss_params params,
                 const std::vector<std::pair<double, float>>& tokens, bool with_entropy) {
  Case c(name);
  const int64_t n = static_cast<int64_t>(tokens.size());
  Matrix x = make_logits(dtype, n, v, stride, 0, 99u + unsigned(v));
  std::vector<int64_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = (i * 37 + 11) % v;
  targets[2] = -100;
  std::vector<RefStats> ref(n);
  std::vector<float> old_logp(n), adv(n), weights(n);
  for (int64_t i = 0; i < n; ++i) {
    ref[i] = ref_stats(x, i, targets[i], 0);
    const double logp = ref[i].target_z - ref_lse(ref[i]);
    old_logp[i] = static_cast<float>(logp - std::log(tokens[i].first));
    adv[i] = tokens[i].second;
    weights[i] = 0.25f + 0.125f * float(i);
  }
  old_logp[n - 1] = adv[n - 1] = NAN;
  weights[n - 1] = 0.0f;
  const bool with_loss = params.loss_kind != SAPO_LOSS_NONE;
  std::vector<float> logp(n, 7.0f), lse(n, 7.0f), entropy(n, 7.0f), loss(n, 7.0f), grad(n, 7.0f);
  c.code(sapo_fused_forward(x.data(), dtype, n, v, stride, targets.data(), kInvTemperature,
                            with_loss ? old_logp.data() : nullptr, with_loss ? adv.data() : nullptr,
                            with_loss ? weights.data() : nullptr, params, logp.data(), lse.data(),
                            with_entropy ? entropy.data() : nullptr, with_loss ? loss.data() : nullptr,
                            with_loss ? grad.data() : nullptr, nullptr),
         0, "sapo_fused_forward");
  for (int64_t i = 0; i < n; ++i) {
    if (targets[i] < 0) {
      c.exact("logp", i, logp[i], 0.0);
      c.exact("lse", i, lse[i], 0.0);
      if (with_entropy) c.exact("entropy", i, entropy[i], 0.0);
      if (with_loss) c.exact("loss", i, loss[i], 0.0);
      if (with_loss) c.exact("grad_coeff", i, grad[i], 0.0);
      continue;
    }
    const double want_lse = ref_lse(ref[i]), want_logp = ref[i].target_z - want_lse;
    c.close("lse", i, lse[i], want_lse, 2e-5, 1e-6);
    c.close("logp", i, logp[i], want_logp, 2e-5, 1e-6);
    if (with_entropy) c.close("entropy", i, entropy[i], ref_entropy(ref[i]), 1e-4, 1e-5);
    if (!with_loss) continue;
    if (weights[i] == 0.0f) {
      c.exact("loss", i, loss[i], 0.0);
      c.exact("grad_coeff", i, grad[i], 0.0);
      continue;
    }
    const RefLoss want = ref_token_loss(params, want_logp, old_logp[i], adv[i]);
    c.close("loss", i, loss[i], weights[i] * want.loss, 1e-6, 1e-4);
    c.close("grad_coeff", i, grad[i], weights[i] * want.grad, 1e-6, 1e-4);
  }
  if (!with_entropy) c.expect(entropy == std::vector<float>(n, 7.0f), "entropy written although NULL was passed");
  return c.report();
}

// ---- sapo_logprob_backward ---------------------------------------------------------------------------------------

// Out of place into an output `grad_stride` wide, or in place (then grad_stride = stride). Row 2 is ignored; row 4's
// target lies in another shard. The columns between v and the row stride must stay untouched.
bool check_backward(const char* name, int32_t dtype, int64_t n, int64_t v, int64_t stride, int64_t offset,
                    int64_t vocab_start, bool in_place, int64_t grad_stride, bool with_entropy) {
  Case c(name);
  Matrix x = make_logits(dtype, n, v, stride, offset, 7u + unsigned(v));
  const float sentinel = 1280.0f;  // exactly representable in bf16
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = v; j < stride; ++j) x.at(i, j) = sentinel;
  x.upload();
  const Matrix original = x;
  Matrix out_of_place(dtype, n, v, grad_stride, 1);
  for (float& value : out_of_place.values) value = sentinel;
  out_of_place.upload();
  Matrix& out = in_place ? x : out_of_place;

  std::vector<int64_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = vocab_start + (i * 53 + 3) % v;
  targets[2] = -100;
  targets[4] = vocab_start + v + 17;
  std::vector<RefStats> ref(n);
  std::vector<float> lse(n), entropy(n), grad_logp(n), grad_entropy(n);
  for (int64_t i = 0; i < n; ++i) {
    // The whole-vocab statistics come from the vocab-parallel merge; one shard stands for the vocab here.
    ref[i] = ref_stats(x, i, targets[i] < 0 ? -1 : vocab_start, vocab_start);
    lse[i] = static_cast<float>(ref_lse(ref[i]));
    entropy[i] = static_cast<float>(ref_entropy(ref[i]));
    grad_logp[i] = 0.5f - 0.3f * float(i);
    grad_entropy[i] = 0.2f + 0.1f * float(i);
  }
  c.code(sapo_logprob_backward(x.data(), dtype, n, v, stride, targets.data(), vocab_start, kInvTemperature,
                               lse.data(), grad_logp.data(), with_entropy ? grad_entropy.data() : nullptr,
                               with_entropy ? entropy.data() : nullptr, out.data(), grad_stride, nullptr),
         0, "sapo_logprob_backward");
  const double rtol = dtype == SAPO_BF16 ? 1.0 / 128 : 1e-5;  // bf16: one unit in the last place
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) {
      const double z = double(original.values[i * stride + j]) * kInvTemperature;
      double want = 0.0;
      if (targets[i] >= 0 && z != -INFINITY) {
        const double p = std::exp(z - lse[i]);
        const double hit = targets[i] - vocab_start == j ? 1.0 : 0.0;
        const double ge = with_entropy ? grad_entropy[i] : 0.0, ent = with_entropy ? entropy[i] : 0.0;
        want = kInvTemperature * (grad_logp[i] * (hit - p) - ge * p * (z - lse[i] + ent));
      }
      if (want == 0.0)
        c.exact("grad_logits", i * grad_stride + j, out.stored(i, j), 0.0);
      else
        c.close("grad_logits", i * grad_stride + j, out.stored(i, j), want, 1e-7, rtol);
    }
    for (int64_t j = v; j < grad_stride; ++j) c.exact("padding", i * grad_stride + j, out.stored(i, j), sentinel);
  }
  return c.report();
}

// ---- argument errors ---------------------------------------------------------------------------------------------

bool check_errors() {
  Case c("argument errors and n == 0");
  float logits[8] = {}, out[8] = {};
  int64_t targets[2] = {0, 1};
  const sapo_loss_params none{SAPO_LOSS_NONE, 1.0f, 1.0f, 0.8f, 1.2f, 0.0f, 20.0f};
  const sapo_loss_params sapo{SAPO_LOSS_SAPO, 1.0f, 1.05f, 0.8f, 1.2f, 0.0f, 20.0f};
  auto stats = [&](int32_t dtype, int64_t n, int64_t v, int64_t stride, const void* x) {
    return sapo_logprob_stats(x, dtype, n, v, stride, targets, 0, 1.0f, out, out, nullptr, out, nullptr);
  };
  auto fused = [&](sapo_loss_params p, int64_t n, const float* old) {
    return sapo_fused_forward(logits, SAPO_F32, n, 4, 4, targets, 1.0f, old, out, out, p, out, out, nullptr, out,
                              out, nullptr);
  };
  auto backward = [&](int64_t n, void* grad, int64_t grad_stride, const float* grad_entropy) {
    return sapo_logprob_backward(logits, SAPO_F32, n, 4, 4, targets, 0, 1.0f, out, out, grad_entropy, nullptr, grad,
                                 grad_stride, nullptr);
  };
  c.code(sapo_abi_version(), SAPO_ABI_VERSION, "sapo_abi_version");
  c.code(stats(3, 2, 4, 4, logits), SAPO_ERR_BAD_DTYPE, "dtype 3");
  c.code(stats(SAPO_F32, -1, 4, 4, logits), SAPO_ERR_BAD_SHAPE, "n < 0");
  c.code(stats(SAPO_F32, 2, 0, 4, logits), SAPO_ERR_BAD_SHAPE, "v == 0");
  c.code(stats(SAPO_F32, 2, 4, 3, logits), SAPO_ERR_BAD_SHAPE, "row_stride < v");
  c.code(stats(SAPO_F32, 2, 4, 4, nullptr), SAPO_ERR_NULL_POINTER, "logits NULL");
  c.code(stats(SAPO_F32, 0, 4, 4, nullptr), 0, "n == 0 with NULL pointers");
  c.code(fused(none, 2, nullptr), 0, "no loss: loss inputs may be NULL");
  c.code(fused(sapo, 2, nullptr), SAPO_ERR_NULL_POINTER, "sapo without old_logp");
  c.code(fused({7, 1.0f, 1.0f, 0.8f, 1.2f, 0.0f, 20.0f}, 2, out), SAPO_ERR_BAD_LOSS, "loss kind 7");
  c.code(fused({SAPO_LOSS_SAPO, 0.0f, 1.0f, 0.8f, 1.2f, 0.0f, 20.0f}, 2, out), SAPO_ERR_BAD_LOSS, "tau_pos 0");
  c.code(fused({SAPO_LOSS_SAPO, 1.0f, NAN, 0.8f, 1.2f, 0.0f, 20.0f}, 2, out), SAPO_ERR_BAD_LOSS, "tau_neg NaN");
  c.code(fused({SAPO_LOSS_GRPO, 1.0f, 1.0f, 1.3f, 1.2f, 0.0f, 20.0f}, 2, out), SAPO_ERR_BAD_LOSS, "low > high");
  c.code(fused({SAPO_LOSS_SAPO, 1.0f, 1.0f, 0.8f, 1.2f, 0.0f, 0.0f}, 2, out), SAPO_ERR_BAD_LOSS, "clamp 0");
  c.code(fused({SAPO_LOSS_SAPO, 0.0f, 1.0f, 0.8f, 1.2f, 0.0f, 20.0f}, 0, nullptr), SAPO_ERR_BAD_LOSS,
         "bad loss with n == 0");
  c.code(backward(2, out, 3, nullptr), SAPO_ERR_BAD_SHAPE, "grad_row_stride < v");
  c.code(backward(1, logits, 8, nullptr), SAPO_ERR_BAD_SHAPE, "in place with another stride");
  c.code(backward(2, out, 4, out), SAPO_ERR_NULL_POINTER, "grad_entropy without entropy");
  c.code(backward(2, nullptr, 4, nullptr), SAPO_ERR_NULL_POINTER, "grad_logits NULL");
  return c.report();
}

// ---- bench -------------------------------------------------------------------------------------------------------

int bench() {
  const int64_t n = 16;
  for (const int64_t v : {int64_t(1000), int64_t(151936)}) {
    Matrix x = make_logits(SAPO_F32, n, v, v, 0, 5u);
    std::vector<int64_t> targets(n, 3);
    std::vector<float> a(n), b(n), c(n), d(n), e(n), old(n, -5.0f), adv(n, 1.0f), w(n, 1.0f);
    const sapo_loss_params sapo{SAPO_LOSS_SAPO, 1.0f, 1.05f, 0.8f, 1.28f, 0.0f, 20.0f};
    Matrix grad(SAPO_F32, n, v, v);
    auto time = [&](const char* what, auto&& launch) {
      const int repeats = 3;
      double best = 1e30;
      for (int k = 0; k < repeats; ++k) {
        const auto start = std::chrono::steady_clock::now();
        if (launch() != 0) std::printf("  %s failed\n", what);
        best = std::fmin(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      std::printf("bench fp32 n=%lld v=%lld %-30s %8.1f ms (best of %d)\n", (long long)n, (long long)v, what,
                  best * 1e3, repeats);
    };
    time("stats (with zexp)", [&] {
      return sapo_logprob_stats(x.data(), SAPO_F32, n, v, v, targets.data(), 0, 1.0f, a.data(), b.data(), c.data(),
                                d.data(), nullptr);
    });
    time("fused forward (sapo, entropy)", [&] {
      return sapo_fused_forward(x.data(), SAPO_F32, n, v, v, targets.data(), 1.0f, old.data(), adv.data(), w.data(),
                                sapo, a.data(), b.data(), c.data(), d.data(), e.data(), nullptr);
    });
    time("backward (entropy)", [&] {
      return sapo_logprob_backward(x.data(), SAPO_F32, n, v, v, targets.data(), 0, 1.0f, b.data(), d.data(),
                                   e.data(), c.data(), grad.data(), v, nullptr);
    });
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "bench") == 0) return bench();
  const sapo_loss_params sapo{SAPO_LOSS_SAPO, 1.0f, 1.05f, 0.8f, 1.28f, 0.0f, 0.45f};
  const sapo_loss_params grpo{SAPO_LOSS_GRPO, 1.0f, 1.0f, 0.8f, 1.28f, 3.0f, 20.0f};
  const sapo_loss_params none{SAPO_LOSS_NONE, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  bool ok = true;
  // Row 0 all -inf (target in another shard), row 2 ignored, row 3's target past the shard.
  ok &= check_stats("stats fp32 v=123 (odd stride: row alignment varies), zexp, all -inf row", SAPO_F32, 6, 123, 123,
                    0, 0, {200, 5, -100, 123 + 9, 122, 0}, true, true);
  ok &= check_stats("stats bf16 v=1000 shard at 1000, no zexp", SAPO_BF16, 5, 1000, 1000, 0, 1000,
                    {1000, 1999, -1, 5, 1500}, false, false);
  ok &= check_stats("stats bf16 v=1000 stride 1003, base +1 element, zexp", SAPO_BF16, 6, 1000, 1003, 1, 1000,
                    {1000, 1999, -1, 5, 1500, 1001}, true, false);
  // (ratio, advantage) with a log-ratio clamp of 0.45: 2.0 and 0.5 lie outside it (gradient 0).
  ok &= check_fused("fused sapo fp32 v=123 entropy, log-ratio clamp, zero weight", SAPO_F32, 123, 123, sapo,
                    {{1.0, 1.3f}, {0.9, -0.7f}, {1.0, 1.0f}, {1.2, 0.4f}, {1.5, -0.7f}, {2.0, 1.3f}, {0.5, -0.7f},
                     {0.7, 0.4f}, {1.0, 1.0f}},
                    true);
  // Kept unclipped, clipped high, (ignored), clipped low, unclipped under the dual cap, dual cap, tie inside the clip
  // range, log-ratio clamp on both sides, zero advantage, (zero weight).
  ok &= check_fused("fused grpo bf16 v=1000 clip, dual clip, clamp", SAPO_BF16, 1000, 1000, grpo,
                    {{0.5, 1.3f}, {1.5, 1.3f}, {1.0, 1.0f}, {0.5, -0.7f}, {1.5, -0.7f}, {5.0, -0.7f}, {1.0, 0.4f},
                     {std::exp(25.0), 2.0f}, {std::exp(-25.0), 2.0f}, {0.9, -0.9f}, {1.2, 0.0f}, {1.0, 1.0f}},
                    false);
  ok &= check_fused("fused no loss fp32 v=1000 stride 1001", SAPO_F32, 1000, 1001, none,
                    {{1.0, 1.0f}, {1.0, 1.0f}, {1.0, 1.0f}, {1.0, 1.0f}, {1.0, 1.0f}}, true);
  ok &= check_backward("backward fp32 v=123 out of place (stride 130), entropy, shard at 100", SAPO_F32, 6, 123, 123,
                       0, 100, false, 130, true);
  ok &= check_backward("backward bf16 v=1000 stride 1008 in place, no entropy", SAPO_BF16, 6, 1000, 1008, 0, 0, true,
                       1008, false);
  ok &= check_backward("backward bf16 v=123 base +1 element in place, entropy", SAPO_BF16, 6, 123, 125, 1, 0, true,
                       125, true);
  ok &= check_errors();
  std::printf(ok ? "ALL PASS\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
