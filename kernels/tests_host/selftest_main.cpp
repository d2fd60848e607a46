// Host driver for selftest_kernels.cu built with kernels/host/cuda_on_cpu.h: checks every kernel against a plain
// double-precision loop and prints PASS/FAIL per case. `selftest misuse` runs a deliberately invalid kernel that
// must abort with a message. Exit status 0 only if every case passed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" {
int selftest_lse_static(const float* logits, int rows, int vocab, float* lse, void* stream);
int selftest_log_softmax_dynamic(const void* logits_bf16, int rows, int vocab, int threads, float* out, void* stream);
int selftest_row_sums_early_exit(const float* values, int rows, int n, int threads, float* row_sums, int* max_index,
                                 unsigned long long* count, double* total, void* stream);
int selftest_histogram(const int* keys, int n, int* hist, unsigned* hist_u, float* hist_f, int* last_index,
                       void* stream);
int selftest_warp_ops(int threads, int* scan, float* broadcast, int* broadcast8, int* down16, double* xor8,
                      unsigned* ballot, int* any_all, int* neighbour, void* stream);
int selftest_shuffle_after_lane_exit(float* out, void* stream);
}

namespace {

constexpr int kCudaErrorInvalidConfiguration = 9;
int failures = 0;

void report(bool ok, const std::string& name, const std::string& detail) {
  std::printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  if (!ok) ++failures;
}

double elapsed_ms(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// Logits in [-8, 8] with a spike every 997 entries, so the running max moves late in a row.
std::vector<float> make_logits(int rows, int vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-8.0f, 8.0f);
  std::vector<float> x(static_cast<size_t>(rows) * vocab);
  for (size_t i = 0; i < x.size(); ++i) x[i] = uniform(rng) + (i % 997 == 996 ? 20.0f : 0.0f);
  return x;
}

std::vector<double> reference_lse(const std::vector<float>& x, int rows, int vocab) {
  std::vector<double> lse(rows);
  for (int r = 0; r < rows; ++r) {
    const float* row = &x[static_cast<size_t>(r) * vocab];
    double m = -INFINITY, s = 0.0;
    for (int i = 0; i < vocab; ++i) m = std::max(m, static_cast<double>(row[i]));
    for (int i = 0; i < vocab; ++i) s += std::exp(row[i] - m);
    lse[r] = m + std::log(s);
  }
  return lse;
}

uint16_t to_bf16(float f) {  // round to nearest even; inputs are finite
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void check_lse_static(int rows, int vocab) {
  const std::vector<float> x = make_logits(rows, vocab, 1000 + vocab);
  std::vector<float> lse(rows);
  const auto start = std::chrono::steady_clock::now();
  const int rc = selftest_lse_static(x.data(), rows, vocab, lse.data(), nullptr);
  const double ms = elapsed_ms(start);
  const std::vector<double> ref = reference_lse(x, rows, vocab);
  double err = 0.0;
  for (int r = 0; r < rows; ++r) err = std::max(err, std::abs(lse[r] - ref[r]));
  char detail[160];
  std::snprintf(detail, sizeof detail, "rc=%d max|err|=%.2e, %.1f ms per launch (%.1f ms per block)", rc, err, ms,
                ms / rows);
  report(rc == 0 && err < 1e-4, "lse_static rows=" + std::to_string(rows) + " V=" + std::to_string(vocab) +
                                    " threads=256", detail);
}

void check_log_softmax_dynamic(int rows, int vocab, int threads) {
  const std::vector<float> x = make_logits(rows, vocab, 2000 + vocab);
  std::vector<uint16_t> xb(x.size());
  std::vector<float> rounded(x.size());
  for (size_t i = 0; i < x.size(); ++i) rounded[i] = from_bf16(xb[i] = to_bf16(x[i]));
  std::vector<float> out(x.size(), NAN);
  const auto start = std::chrono::steady_clock::now();
  const int rc = selftest_log_softmax_dynamic(xb.data(), rows, vocab, threads, out.data(), nullptr);
  const double ms = elapsed_ms(start);
  const std::vector<double> lse = reference_lse(rounded, rows, vocab);
  double err = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double diff = std::abs(out[i] - (rounded[i] - lse[i / vocab]));
    err = std::isnan(diff) ? INFINITY : std::max(err, diff);
  }
  char detail[160];
  std::snprintf(detail, sizeof detail, "rc=%d max|err|=%.2e, %.1f ms per launch (%.1f ms per block)", rc, err, ms,
                ms / rows);
  report(rc == 0 && err < 1e-4, "log_softmax_dynamic bf16 rows=" + std::to_string(rows) + " V=" +
                                    std::to_string(vocab) + " threads=" + std::to_string(threads), detail);
}

void check_invalid_block() {
  const std::vector<uint16_t> x(100, 0);
  std::vector<float> out(100, 1.0f);
  const int rc = selftest_log_softmax_dynamic(x.data(), 1, 100, 100, out.data(), nullptr);
  report(rc == kCudaErrorInvalidConfiguration && out[0] == 1.0f, "100-thread block rejected",
         "rc=" + std::to_string(rc));
}

void check_early_exit(int rows, int n, int threads) {
  std::vector<float> values(static_cast<size_t>(rows) * n);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * static_cast<float>(i % 7);  // sums are exact
  std::vector<float> sums(rows, NAN);
  int max_index = -1;
  unsigned long long count = 0;
  double total = 0.0;
  const auto start = std::chrono::steady_clock::now();
  const int rc = selftest_row_sums_early_exit(values.data(), rows, n, threads, sums.data(), &max_index, &count,
                                              &total, nullptr);
  const double ms = elapsed_ms(start);
  bool ok = rc == 0 && max_index == n - 1 && count == static_cast<unsigned long long>(rows) * n;
  double expected_total = 0.0;
  for (int r = 0; r < rows; ++r) {
    double expected = 0.0;
    for (int i = 0; i < n; ++i) expected += values[static_cast<size_t>(r) * n + i];
    ok = ok && sums[r] == expected;
    expected_total += expected;
  }
  ok = ok && total == expected_total;
  char detail[160];
  std::snprintf(detail, sizeof detail, "rc=%d max_index=%d count=%llu total=%g, %.1f ms per launch", rc, max_index,
                count, total, ms);
  report(ok, "early_exit rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " threads=" +
                 std::to_string(threads), detail);
}

void check_histogram(int n, int bins) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> key(0, bins - 1);
  std::vector<int> keys(n);
  for (int& k : keys) k = key(rng);
  std::vector<int> hist(bins, 0);
  std::vector<unsigned> hist_u(bins, 0);
  std::vector<float> hist_f(bins, 0.0f);
  int last_index = -1;
  const int rc = selftest_histogram(keys.data(), n, hist.data(), hist_u.data(), hist_f.data(), &last_index, nullptr);
  std::vector<int> expected(bins, 0);
  for (int k : keys) ++expected[k];
  bool ok = rc == 0 && last_index >= 0 && last_index < n;
  for (int b = 0; b < bins; ++b)
    ok = ok && hist[b] == expected[b] && hist_u[b] == 2u * expected[b] && hist_f[b] == 0.5f * expected[b];
  report(ok, "histogram n=" + std::to_string(n) + " grid 3x2 block 32x4",
         "rc=" + std::to_string(rc) + " last_index=" + std::to_string(last_index));
}

void check_warp_ops(int threads) {
  std::vector<int> scan(threads), broadcast8(threads), down16(threads), any_all(threads), neighbour(threads);
  std::vector<float> broadcast(threads);
  std::vector<double> xor8(threads);
  std::vector<unsigned> ballot(threads);
  const int rc = selftest_warp_ops(threads, scan.data(), broadcast.data(), broadcast8.data(), down16.data(),
                                   xor8.data(), ballot.data(), any_all.data(), neighbour.data(), nullptr);
  int bad = 0;
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, base = t - lane;
    int prefix = 0;
    for (int u = base; u <= t; ++u) prefix += u + 1;
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= static_cast<unsigned>((base + l) % 3 == 0) << l;
    int any = 0, all = 1;
    for (int l = 0; l < 32; ++l) any |= base + l == 40, all &= base + l < 48;
    bad += scan[t] != prefix;
    bad += broadcast[t] != 0.5f * (base + 5);
    bad += broadcast8[t] != (t & ~7) + 3;
    bad += down16[t] != ((lane % 16) + 3 < 16 ? t + 3 : t);
    bad += xor8[t] != ((lane & 8) ? (t ^ 8) + 0.25 : t + 0.25);
    bad += ballot[t] != bits;
    bad += any_all[t] != (any | (all << 1));
    bad += neighbour[t] != 7 * (t ^ 1);
  }
  report(rc == 0 && bad == 0, "warp_ops threads=" + std::to_string(threads),
         "rc=" + std::to_string(rc) + " mismatches=" + std::to_string(bad));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "misuse") {
    float out[32];
    selftest_shuffle_after_lane_exit(out, nullptr);
    std::printf("FAIL misuse: the invalid shuffle did not abort\n");
    return 1;
  }
  check_warp_ops(64);
  check_lse_static(4, 50257);
  check_lse_static(8, 1000);
  check_lse_static(3, 100);
  check_log_softmax_dynamic(4, 50257, 256);
  check_log_softmax_dynamic(8, 1000, 256);
  check_log_softmax_dynamic(3, 100, 256);
  check_log_softmax_dynamic(2, 1000, 1024);
  check_log_softmax_dynamic(5, 77, 32);
  check_invalid_block();
  check_early_exit(4, 100, 256);
  check_early_exit(2, 256, 256);
  check_early_exit(3, 1, 64);
  check_histogram(10000, 37);
  std::printf("%s: %d failure(s)\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures == 0 ? 0 : 1;
}
