// gemv.h without PyTorch, against a plain double-precision reference: built by
// tests/test_native_kernels.py for the host and, with an aarch64 cross-compiler, for ARM
// (NEON, with and without the dot-product extension) and run under qemu-aarch64.
//
// Every format (FP32, BF16, INT8, INT4), per-row and group scales, batch 1-9 and 19, odd widths,
// 1 and 2 threads, with the integer-activation kernels on (checked against their rounding
// bound) and off (FP32 rounding only). Prints the ISA and "ok", or the first failure.
#define GLM_NO_TORCH
#include "../../src/glm130b/quant/kernels/gemv.h"

#include <cstdio>
#include <random>

using namespace glm;

namespace {
std::mt19937 rng(1234);
float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

int failures = 0;

// One product: W [N, K] in `fmt` (groups of G inputs, 0: per row), x [M, K].
void check(int fmt, int64_t N, int64_t K, int64_t G, int64_t M, int threads) {
  const int64_t Ku = fmt == I4 ? (K + 1) / 2 : K;
  const int64_t Gsz = (fmt == I8 || fmt == I4) && G > 0 && G < K ? G : K;
  const int64_t ng = (K + Gsz - 1) / Gsz;
  std::vector<double> wd(N * K);  // the dequantized weights the reference multiplies
  std::vector<float> wf, sc(N * ng), bias(N), x(M * K), y(M * N);
  std::vector<uint16_t> wb;
  std::vector<int8_t> w8;
  std::vector<uint8_t> w4;
  for (auto& b : bias) b = randn();
  for (int64_t i = 0; i < M * K; ++i) x[i] = randn() * (0.01f + 4.f * static_cast<float>(i % K) / K);
  if (M > 0)
    for (int64_t k = 0; k < K / 3; ++k) x[k] = 0.f;  // zero blocks in row 0
  if (fmt == F32) wf.resize(N * K);
  if (fmt == BF16) wb.resize(N * K);
  if (fmt == I8) w8.resize(N * K);
  if (fmt == I4) w4.assign(N * Ku, 0x88);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < ng; ++g) {
      const float s = 0.01f + 0.1f * std::fabs(randn());
      sc[n * ng + g] = s;
      for (int64_t k = g * Gsz; k < std::min(K, (g + 1) * Gsz); ++k) {
        const float v = randn();
        if (fmt == F32) {
          wf[n * K + k] = v;
          wd[n * K + k] = v;
        } else if (fmt == BF16) {
          wb[n * K + k] = to_bf16(v);
          wd[n * K + k] = scalar_of(wb[n * K + k]);
        } else {
          const int lim = fmt == I8 ? 127 : 7;
          const int q = std::max(-lim, std::min(lim, static_cast<int>(std::lround(v * lim / 2.5f))));
          wd[n * K + k] = static_cast<double>(q) * s;
          if (fmt == I8) w8[n * K + k] = static_cast<int8_t>(q);
          else {
            uint8_t& byte = w4[n * Ku + k / 2];
            byte = (k & 1) ? static_cast<uint8_t>((byte & 0x0F) | ((q + 8) << 4)) : static_cast<uint8_t>((byte & 0xF0) | (q + 8));
          }
        }
      }
    }
  Problem p{};
  p.w = fmt == F32 ? static_cast<const void*>(wf.data()) : fmt == BF16 ? static_cast<const void*>(wb.data())
        : fmt == I8 ? static_cast<const void*>(w8.data()) : static_cast<const void*>(w4.data());
  p.Ku = Ku;
  p.N = N;
  p.ng = fmt == I8 || fmt == I4 ? ng : 1;
  p.Gu = p.ng > 1 ? (fmt == I4 ? Gsz / 2 : Gsz) : Ku;
  p.scales = fmt == I8 || fmt == I4 ? sc.data() : nullptr;
  p.bias = bias.data();
  p.y = y.data();
  // the integer kernels round each input to its block's step: INT8 blocks of 32, INT4 of 64
  const int64_t blk = fmt == I4 ? 64 : 32;
  const int q8 = GLM_Q8;
  for (int intact = 0; intact < 2; ++intact) {
    int_act_enabled().store(intact == 1);
    Scratch s;
    gemv(p, x.data(), M, K, fmt, threads, s);
    for (int64_t m = 0; m < M; ++m) {
      std::vector<double> step(K, 0.0);
      for (int64_t b0 = 0; b0 < K; b0 += blk) {
        double amax = 0;
        for (int64_t k = b0; k < std::min(K, b0 + blk); ++k) amax = std::max(amax, std::fabs(double(x[m * K + k])));
        for (int64_t k = b0; k < std::min(K, b0 + blk); ++k) step[k] = amax / 127.0;
      }
      double ymax = 0;
      std::vector<double> ref(N), bound(N);
      for (int64_t n = 0; n < N; ++n) {
        double acc = bias[n], bnd = 0;
        for (int64_t k = 0; k < K; ++k) {
          acc += wd[n * K + k] * x[m * K + k];
          bnd += std::fabs(wd[n * K + k]) * step[k] / 2;
        }
        ref[n] = acc;
        bound[n] = bnd;
        ymax = std::max(ymax, std::fabs(acc));
      }
      const double rounding = 2e-6 * std::sqrt(double(K)) * ymax + 1e-6;
      const bool integer = intact && q8 && (fmt == I8 || fmt == I4) && !GLM_I4_VNNI;
      for (int64_t n = 0; n < N; ++n) {
        const double err = std::fabs(y[m * N + n] - ref[n]), lim = rounding + (integer ? bound[n] : 0.0);
        if (!(err <= lim)) {
          if (failures++ < 5)
            std::printf("FAIL fmt %d N %lld K %lld G %lld M %lld threads %d int %d: row %lld col %lld err %g > %g\n", fmt,
                        (long long)N, (long long)K, (long long)G, (long long)M, threads, intact, (long long)m,
                        (long long)n, err, lim);
          break;
        }
      }
    }
  }
  int_act_enabled().store(true);
}
}  // namespace

int main() {
  const int64_t shapes[][2] = {{1, 1}, {7, 5}, {33, 1365}, {64, 128}, {130, 344}, {96, 1000}, {40, 2752}};
  int n = 0;
  for (int fmt : {F32, BF16, I8, I4})
    for (auto& sh : shapes)
      for (int64_t G : {0, 6, 64, 128})
        for (int64_t M : {1, 2, 4, 5, 8, 9, 19})  // 8 and more: the 8-row tile kernel where built
          for (int threads : {1, 2}) {
            if ((fmt == F32 || fmt == BF16) && G) continue;
            check(fmt, sh[0], sh[1], G, M, threads);
            ++n;
          }
  std::printf("isa %s lanes %d q8 %d tile %d dot %s: %d products, %d failures\n", ISA, LANES, int(GLM_Q8),
              int(GLM_Q8_TILE), Q8_DOT, n, failures);
  if (failures == 0) std::printf("ok\n");
  return failures ? 1 : 0;
}
