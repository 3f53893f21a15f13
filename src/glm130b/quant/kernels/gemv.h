// Fused weight-only GEMV / small-batch GEMM for CPU: y[M, N] = x[M, K] @ W[N, K]^T + bias.
//
// W is one of: FP32, BF16, INT8 (+ FP32 scales per row or per group), packed INT4 (two per
// byte, input 2j in the low nibble, 2j+1 in the high nibble, each stored as q + 8; + scales).
// Decoding reads every weight once per token, so at batch 1 the product is bound by memory
// bandwidth: the weights are streamed exactly once, converted to FP32 in registers (never
// written back), and multiplied with up to 4 rows of x at a time (a row tile of weights stays in
// L2 while the batch passes over it in chunks of 4). Accumulation is FP32; the scale of a group is applied once per group.
//
// INT4 trick: instead of interleaving nibbles, x is split once per call into its even and odd
// inputs, so the low nibbles of 16 consecutive bytes multiply x_even[j..j+16) and the high
// nibbles x_odd[j..j+16). The canonical packed layout is used as stored: no repacking.
//
// Compiled for the CPU that runs it (flags from its detected instruction sets, see
// glm130b/quant/kernels/cpu.py); AVX-512, AVX2+FMA, ARM NEON and plain C++ paths share this
// code: the instruction-set specifics are the small inline helpers of each section.
// cpu_gemv.cpp exposes it to PyTorch; decode_step.cpp runs a whole decode step with it.
// With GLM_NO_TORCH defined the header needs no PyTorch (the standalone ARM test under qemu).
#pragma once
#ifndef GLM_NO_TORCH
#include <ATen/core/Tensor.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace glm {

// ------------------------------------------------------------------------------------------
// A thin SIMD layer: vf is LANES floats.
// ------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int MAXM = 4;  // rows of x per pass over a weight tile (8 measured slower: 4.5 vs 3.9 ms at batch 8)
constexpr const char* ISA = "avx512";
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vset1(float s) { return _mm512_set1_ps(s); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf cvt_bf16(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline vf cvt_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void cvt_u4(const uint8_t* p, vf& lo, vf& hi) {
  const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f,
                                      0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
constexpr int MAXM = 4;
constexpr const char* ISA = "avx2";
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vset1(float s) { return _mm256_set1_ps(s); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf cvt_bf16(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline vf cvt_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void cvt_u4(const uint8_t* p, vf& lo, vf& hi) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i eight = _mm256_set1_epi32(8);
  lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, _mm256_set1_epi32(15)), eight));
  hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
constexpr int LANES = 4;
constexpr int MAXM = 4;
constexpr const char* ISA = "neon";
using vf = float32x4_t;
inline vf vzero() { return vdupq_n_f32(0.f); }
inline vf vload(const float* p) { return vld1q_f32(p); }
inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vset1(float s) { return vdupq_n_f32(s); }
inline float vsum(vf a) { return vaddvq_f32(a); }
inline vf cvt_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline int8x8_t load4_s8(const void* p) {  // 4 bytes into the low half of a vector
  int32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpret_s8_s32(vdup_n_s32(v));
}
inline vf cvt_i8(const int8_t* p) { return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(load4_s8(p))))); }
inline void cvt_u4(const uint8_t* p, vf& lo, vf& hi) {
  const int32x4_t v = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_s8(load4_s8(p))))));
  lo = vcvtq_f32_s32(vsubq_s32(vandq_s32(v, vdupq_n_s32(15)), vdupq_n_s32(8)));
  hi = vcvtq_f32_s32(vsubq_s32(vshrq_n_s32(v, 4), vdupq_n_s32(8)));
}
#else
constexpr int LANES = 1;
constexpr int MAXM = 4;
constexpr const char* ISA = "scalar";
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vset1(float s) { return s; }
inline float vsum(vf a) { return a; }
inline vf cvt_bf16(const uint16_t* p) {
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline vf cvt_i8(const int8_t* p) { return static_cast<float>(*p); }
inline void cvt_u4(const uint8_t* p, vf& lo, vf& hi) {
  lo = static_cast<float>((*p & 15) - 8);
  hi = static_cast<float>((*p >> 4) - 8);
}
#endif

enum Fmt : int { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

// Software prefetch distance in bytes ahead of each weight row's read position (0: off). The
// hardware prefetchers keep up with FP32 / BF16 rows, but INT4 / INT8 rows are consumed slowly
// (16-32 bytes per iteration and row); measured +20-50% DRAM throughput for them here.
#ifndef GLM_PF
#define GLM_PF 1024
#endif
inline void prefetch_line(const void* p) {  // (GLM_PF 0: prefetching off)
#if GLM_PF > 0 && (defined(__AVX512F__) || defined(__AVX2__))
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#elif GLM_PF > 0 && defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}
template <typename T>
inline void prefetch_row(const T* p, int64_t j) {
  prefetch_line(reinterpret_cast<const char*>(p + j) + GLM_PF);
}

template <int FMT> struct Unit;
template <> struct Unit<F32> { using T = float; };
template <> struct Unit<BF16> { using T = uint16_t; };
template <> struct Unit<I8> { using T = int8_t; };
template <> struct Unit<I4> { using T = uint8_t; };

inline float scalar_of(float w) { return w; }
inline float scalar_of(uint16_t w) {
  uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float scalar_of(int8_t w) { return static_cast<float>(w); }

// Weight rows per pass: one. R rows at once would let each loaded x vector serve R rows, but
// the products here are memory bound, and a thread's rows read one at a time stream as one
// sequential read: measured on a Zen 5, 2 or 4 rows interleaved (Ku bytes apart) ran at
// 0.5-0.8x the bandwidth of one, worst when rows are 4 KiB apart, at batch 1 and at batch 4-8
// alike (an FP32 batch-4 product of glm-small's layers: 4.45 -> 3.0 ms). The kernel keeps R as
// a parameter for CPUs where that differs.
constexpr int ROWS_PER_PASS = 1;

struct Problem {
  const void* w;      // [N, Ku] units
  int64_t Ku;         // units per row (INT4: bytes = ceil(K/2))
  int64_t Gu;         // units per group
  int64_t ng;         // groups per row
  const float* scales;  // [N, ng] or null
  const float* xs;    // [M, xstride]; INT4: even inputs at [0, Ku), odd at [Ku, 2Ku)
  int64_t xstride;
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t N;
};

// R consecutive rows starting at row0, against M rows of x starting at m0, over the units
// [jb, je) of each row; the partial products are ADDED to y (which starts as the bias).
// Segments are the pieces of [jb, je) inside one scale group: a segment's sum is multiplied
// by its group's scale once.
template <int FMT, int M, int R>
inline void rows_kernel(const Problem& p, int64_t row0, int64_t m0, int64_t jb, int64_t je) {
  using T = typename Unit<FMT>::T;
  constexpr bool DUAL = R * M < 8;  // two accumulator chains per output when there are few
  const T* w[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) w[r] = static_cast<const T*>(p.w) + (row0 + r) * p.Ku;
  const float* xm[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) xm[m] = p.xs + (m0 + m) * p.xstride;

  vf tot[R][M];
  float tail_tot[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      tot[r][m] = vzero();
      tail_tot[r][m] = 0.f;
    }

  for (int64_t j0 = jb; j0 < je;) {
    const int64_t g = j0 / p.Gu;
    const int64_t j1 = std::min(je, (g + 1) * p.Gu);
    vf a0[R][M], a1[R][M];
    float t[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        a0[r][m] = vzero();
        a1[r][m] = vzero();
        t[r][m] = 0.f;
      }
    int64_t j = j0;
    if constexpr (FMT == I4) {
      for (; j + LANES <= j1; j += LANES) {
        vf lo[R], hi[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          if ((j & 63) < LANES) prefetch_row(w[r], j);
          cvt_u4(w[r] + j, lo[r], hi[r]);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const vf xe = vload(xm[m] + j);
          const vf xo = vload(xm[m] + p.Ku + j);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            a0[r][m] = vfma(lo[r], xe, a0[r][m]);
            if constexpr (DUAL) a1[r][m] = vfma(hi[r], xo, a1[r][m]);
            else a0[r][m] = vfma(hi[r], xo, a0[r][m]);
          }
        }
      }
      for (; j < j1; ++j) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const float lo = static_cast<float>((w[r][j] & 15) - 8);
          const float hi = static_cast<float>((w[r][j] >> 4) - 8);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) t[r][m] += lo * xm[m][j] + hi * xm[m][p.Ku + j];
        }
      }
    } else {
      for (; j + 2 * LANES <= j1; j += 2 * LANES) {
        vf v0[R], v1[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          if constexpr (FMT == I8)  // FP32 / BF16 rows are consumed fast enough for the hardware
            if ((j & 63) < 2 * LANES) prefetch_row(w[r], j);
          if constexpr (FMT == F32) {
            v0[r] = vload(w[r] + j);
            v1[r] = vload(w[r] + j + LANES);
          } else if constexpr (FMT == BF16) {
            v0[r] = cvt_bf16(w[r] + j);
            v1[r] = cvt_bf16(w[r] + j + LANES);
          } else {
            v0[r] = cvt_i8(w[r] + j);
            v1[r] = cvt_i8(w[r] + j + LANES);
          }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const vf x0 = vload(xm[m] + j);
          const vf x1 = vload(xm[m] + j + LANES);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            a0[r][m] = vfma(v0[r], x0, a0[r][m]);
            if constexpr (DUAL) a1[r][m] = vfma(v1[r], x1, a1[r][m]);
            else a0[r][m] = vfma(v1[r], x1, a0[r][m]);
          }
        }
      }
      for (; j < j1; ++j) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const float wv = scalar_of(w[r][j]);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) t[r][m] += wv * xm[m][j];
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float s = p.scales ? p.scales[(row0 + r) * p.ng + g] : 1.f;
      const vf sv = vset1(s);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const vf a = DUAL ? vadd(a0[r][m], a1[r][m]) : a0[r][m];
        tot[r][m] = vfma(a, sv, tot[r][m]);
        tail_tot[r][m] += s * t[r][m];
      }
    }
    j0 = j1;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) p.y[(m0 + m) * p.N + row0 + r] += vsum(tot[r][m]) + tail_tot[r][m];
}

template <int FMT, int M>
inline void rows_range(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int64_t jb, int64_t je) {
  constexpr int R = ROWS_PER_PASS;
  int64_t r = r0;
  for (; r + R <= r1; r += R) rows_kernel<FMT, M, R>(p, r, m0, jb, je);
  for (; r < r1; ++r) rows_kernel<FMT, M, 1>(p, r, m0, jb, je);
}

template <int FMT>
inline void rows_dispatch(const Problem& p, int64_t r0, int64_t r1, int64_t m0, int mb, int64_t jb, int64_t je) {
  switch (mb) {
    case 1: rows_range<FMT, 1>(p, r0, r1, m0, jb, je); break;
    case 2: rows_range<FMT, 2>(p, r0, r1, m0, jb, je); break;
    case 3: rows_range<FMT, 3>(p, r0, r1, m0, jb, je); break;
    case 4: rows_range<FMT, 4>(p, r0, r1, m0, jb, je); break;
    default: break;  // gemv_run passes 1..MAXM
  }
}

inline int64_t unit_bytes(int fmt) { return fmt == F32 ? 4 : fmt == BF16 ? 2 : 1; }

#ifndef GLM_NO_TORCH
// The Problem of weight w (checked against format fmt and K logical inputs), with its scales
// (INT8 / INT4) and bias; x and y are left for the caller. The tensors must outlive the Problem.
inline Problem weight_problem(const at::Tensor& w, const c10::optional<at::Tensor>& scales, int64_t group_size,
                              const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be contiguous 2-D");
  TORCH_CHECK(fmt >= 0 && fmt <= 3, "unknown weight format ", fmt);
  const int64_t N = w.size(0), Ku = w.size(1);
  const at::ScalarType want[4] = {at::kFloat, at::kBFloat16, at::kChar, at::kByte};
  TORCH_CHECK(w.scalar_type() == want[fmt], "weight dtype does not match the format");
  TORCH_CHECK(fmt == I4 ? Ku == (K + 1) / 2 : Ku == K, "weight has ", Ku, " columns for ", K, " inputs");
  Problem p{};
  p.w = w.data_ptr();
  p.Ku = Ku;
  p.N = N;
  p.ng = 1;
  p.Gu = Ku;
  if (fmt == I8 || fmt == I4) {
    TORCH_CHECK(scales.has_value() && scales->defined(), "quantized weights need scales");
    const at::Tensor& sc = *scales;
    TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.dim() == 2 && sc.size(0) == N && sc.is_contiguous(),
                "scales must be contiguous FP32 [N, groups]");
    p.ng = sc.size(1);
    if (p.ng > 1) {
      TORCH_CHECK(group_size > 0 && (fmt == I8 || group_size % 2 == 0), "bad group size ", group_size);
      p.Gu = fmt == I4 ? group_size / 2 : group_size;
      TORCH_CHECK((K + group_size - 1) / group_size == p.ng, "scales have ", p.ng, " groups; expected ",
                  (K + group_size - 1) / group_size);
    }
    p.scales = sc.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N && b.is_contiguous(), "bias must be contiguous FP32 [N]");
    p.bias = b.data_ptr<float>();
  }
  return p;
}

#endif  // GLM_NO_TORCH

// Row width of the prepared x: INT4 splits each row into its even and odd inputs.
inline int64_t x_width(int fmt, int64_t K, int64_t Ku) { return fmt == I4 ? 2 * Ku : K; }

// Padded row stride of the prepared x: the padding keeps rows of x from sitting exactly a
// multiple of 4 KiB apart (L1 set conflicts when several rows are read side by side).
inline int64_t x_stride(int fmt, int64_t M, int64_t K, int64_t Ku) {
  const int64_t width = x_width(fmt, K, Ku);
  return M > 1 ? ((width + 15) / 16) * 16 + 16 : width;
}

// Copy x [M, K] into dst [M, stride] (zeroed padding) in the layout the kernels read.
inline void prepare_x(const float* x, int64_t M, int64_t K, int64_t Ku, int fmt, float* dst, int64_t stride) {
  for (int64_t m = 0; m < M; ++m) {
    float* d = dst + m * stride;
    const float* s = x + m * K;
    std::fill(d, d + stride, 0.f);
    if (fmt == I4) {
      for (int64_t k = 0; k + 1 < K; k += 2) {
        d[k >> 1] = s[k];
        d[Ku + (k >> 1)] = s[k + 1];
      }
      if (K & 1) d[K >> 1] = s[K - 1];
    } else {
      std::memcpy(d, s, sizeof(float) * K);
    }
  }
}

// Split rows [0, N) over up to `threads` OpenMP threads (at multiples of 4 rows) by the
// weights x batch-rows rule of gemv_run; fn(begin, end) runs each share.
template <typename Fn>
inline void split_rows(int64_t N, int64_t volume, int64_t threads, Fn&& fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, std::min<int64_t>(N / 16, volume >> 19)));
  if (nt == 1) {
    fn(int64_t(0), N);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = ((N * t / n) / 8) * 8;  // whole tiles of 8 rows (q8_tile) per thread
    const int64_t end = t + 1 == n ? N : ((N * (t + 1) / n) / 8) * 8;
    if (begin < end) fn(begin, end);
  }
}

// p.y [M, N] (holding the bias, or zeros) += x @ W^T, on up to `threads` OpenMP threads.
inline void gemv_run(const Problem& p, int64_t M, int fmt, int64_t threads) {
  const int64_t N = p.N, Ku = p.Ku;
  if (M == 0 || N == 0) return;
  // Cache blocking (matters for M > 1): rows in tiles of about 64 KiB of weights, which stay in
  // L2 while each batch tile of x passes over them; the inputs in blocks whose slice of x
  // (MAXM rows) fits in L1, so a batch tile's x is loaded from L1 once per weight vector.
  const int64_t ub = unit_bytes(fmt);
  const int64_t row_bytes = std::max<int64_t>(1, Ku * ub);
  const int64_t tile = std::max<int64_t>(8, ((65536 / row_bytes) / 4) * 4);
  const int64_t mb_max = std::min<int64_t>(MAXM, M);
  int64_t kblock = (24 * 1024 / 4) / (mb_max * (fmt == I4 ? 2 : 1));
  if (p.Gu < Ku && p.Gu <= kblock) kblock = (kblock / p.Gu) * p.Gu;   // whole groups
  else kblock = std::max<int64_t>(2 * LANES, (kblock / (2 * LANES)) * (2 * LANES));
  if (M == 1 || kblock >= Ku) kblock = Ku;
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for (int64_t jb = 0; jb < Ku; jb += kblock) {
        const int64_t je = std::min(Ku, jb + kblock);
        for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
          const int mb = static_cast<int>(std::min<int64_t>(MAXM, M - m0));
          switch (fmt) {
            case F32: rows_dispatch<F32>(p, t0, t1, m0, mb, jb, je); break;
            case BF16: rows_dispatch<BF16>(p, t0, t1, m0, mb, jb, je); break;
            case I8: rows_dispatch<I8>(p, t0, t1, m0, mb, jb, je); break;
            default: rows_dispatch<I4>(p, t0, t1, m0, mb, jb, je); break;
          }
        }
      }
    }
  };
  // Threads only pay off for big products: a fork/join costs microseconds, and on a busy machine
  // a barrier waits for a descheduled thread. The work is counted in weights x batch rows, not
  // bytes: an INT4 weight costs a core about as much time as an FP32 one (it is unpacked, not
  // just read), and a batch of 8 is 8x the arithmetic. At least ~0.5M of them per thread (2 MB
  // of FP32 weights at batch 1). Measured: a batch-8 decode step of glm-small 8.0 -> 6.5 ms;
  // a 1.5 MB INT4 matrix at batch 1 streamed ~16 GB/s on one thread, ~28 GB/s on two.
  split_rows(N, N * Ku * (fmt == I4 ? 2 : 1) * M, threads, work);
}

// ------------------------------------------------------------------------------------------
// INT4 x 16-bit fixed-point activations with AVX-512 VNNI integer dot products.
//
// The FP32 INT4 path above converts every nibble to a float (three shuffles per 32 weights),
// which bounds it at about half the DRAM bandwidth of a fast 2-core machine. Here x is instead
// quantized once per call, in blocks of 64 even (or odd) inputs, to 16-bit integers
// x16 = round(x / step), step = absmax(block) / 32639, stored as two int8 terms
// x16 = 256 * hi + lo; `vpdpbusd` multiplies 64 unsigned nibbles (q + 8) by 64 int8 terms per
// instruction. Per block and row, sum((q + 8) * x16) - 8 * sum(x16) is an exact integer
// (|lane| < 2^24, so its conversion to float is exact too), then scaled by the block's step.
// The only rounding beyond the FP32 path's is x's: at most step / 2 = absmax / 65278 per input,
// finer than FP16 activations (GLM-130B's own inference: 2^-11 of each value) for any input
// within 1/32 of its block's largest. Weight layout unchanged: packed as stored. Used when the
// weight's groups are whole 128-input blocks (or one per row) and the CPU has AVX-512 VNNI.
// ------------------------------------------------------------------------------------------
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GLM_I4_VNNI 1
#ifndef GLM_VPF
#define GLM_VPF 1024
#endif
constexpr int64_t VB = 64;    // units (packed bytes) per activation block
constexpr int VNNI_MAXM = 4;  // rows of x per pass

struct QuantX {  // one call's x in the VNNI layout
  int64_t nb = 0, M = 0;
  std::vector<int8_t> q;      // [M][2 halves][2 terms][nb * 64]
  std::vector<float> step;    // [M][2][nb]
  std::vector<int32_t> corr;  // [M][2][nb][16]: 8 * (sum of the 4 x16 of each lane)
  const int8_t* terms(int64_t m, int h, int t) const { return q.data() + ((m * 2 + h) * 2 + t) * nb * VB; }
};

inline bool vnni_fits(const Problem& p) { return p.Gu == p.Ku || p.Gu % VB == 0; }

inline void quantize_x(const float* x, int64_t M, int64_t K, int64_t Ku, QuantX& qx) {
  qx.M = M;
  qx.nb = (Ku + VB - 1) / VB;
  const int64_t nb = qx.nb, width = nb * VB;
  qx.q.resize(static_cast<size_t>(M * 4 * width));
  qx.step.resize(static_cast<size_t>(M * 2 * nb));
  qx.corr.resize(static_cast<size_t>(M * 2 * nb * 16));
  std::vector<float> half(static_cast<size_t>(2 * width));  // x's even and odd inputs, zero padded
  const __m512i eight = _mm512_set1_epi8(8);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(half.begin(), half.end(), 0.f);
    const float* xm = x + m * K;
    for (int64_t k = 0; k < K; ++k) half[(k & 1) * width + (k >> 1)] = xm[k];
    for (int h = 0; h < 2; ++h) {
      int8_t* hi = qx.q.data() + ((m * 2 + h) * 2 + 0) * width;
      int8_t* lo = qx.q.data() + ((m * 2 + h) * 2 + 1) * width;
      for (int64_t b = 0; b < nb; ++b) {
        const float* v = half.data() + h * width + b * VB;
        __m512 amax = _mm512_setzero_ps();
        for (int c = 0; c < 4; ++c) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(v + 16 * c)));
        const float a = _mm512_reduce_max_ps(amax);
        const float inv = a > 0.f ? 32639.f / a : 0.f;
        qx.step[(m * 2 + h) * nb + b] = a / 32639.f;
        for (int c = 0; c < 4; ++c) {  // x16 = round(x / step) = 256 * hi + lo, lo in [-128, 127]
          __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + 16 * c), _mm512_set1_ps(inv)));
          q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-32639)), _mm512_set1_epi32(32639));
          const __m512i qh = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
          const __m512i ql = _mm512_sub_epi32(q, _mm512_slli_epi32(qh, 8));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + b * VB + 16 * c), _mm512_cvtepi32_epi8(qh));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + b * VB + 16 * c), _mm512_cvtepi32_epi8(ql));
        }
        // 8 * (sum of each lane's 4 x16), the same lanes vpdpbusd forms: the "+ 8" of the nibbles
        const __m512i qh = _mm512_loadu_si512(hi + b * VB), ql = _mm512_loadu_si512(lo + b * VB);
        const __m512i corr = _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, qh), 8),
                                              _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, ql));
        _mm512_storeu_si512(qx.corr.data() + ((m * 2 + h) * nb + b) * 16, corr);
      }
    }
  }
}

// R rows from row0 against x rows [m0, m0 + M): y += W x over all units (scales per group).
template <int M, int R>
inline void vnni_rows(const Problem& p, const QuantX& qx, int64_t row0, int64_t m0) {
  const uint8_t* w[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) w[r] = static_cast<const uint8_t*>(p.w) + (row0 + r) * p.Ku;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 tot[R][M], acc[R][M], acc2[R][M];  // two chains per output: even and odd inputs
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) tot[r][m] = acc[r][m] = acc2[r][m] = _mm512_setzero_ps();
  const int64_t nb = qx.nb, bpg = p.Gu == p.Ku ? nb : p.Gu / VB;  // blocks per scale group
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j = b * VB;
    const bool full = j + VB <= p.Ku;
    const __mmask64 live = full ? ~__mmask64(0) : (__mmask64(1) << (p.Ku - j)) - 1;
    __m512i lo[R], hi[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#if GLM_VPF > 0
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + j) + GLM_VPF, _MM_HINT_T0);
#endif
      const __m512i v = full ? _mm512_loadu_si512(w[r] + j) : _mm512_maskz_loadu_epi8(live, w[r] + j);
      lo[r] = _mm512_and_si512(v, nib);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const int64_t mm = m0 + m;
      const __m512i eh = _mm512_loadu_si512(qx.terms(mm, 0, 0) + j), el = _mm512_loadu_si512(qx.terms(mm, 0, 1) + j);
      const __m512i oh = _mm512_loadu_si512(qx.terms(mm, 1, 0) + j), ol = _mm512_loadu_si512(qx.terms(mm, 1, 1) + j);
      const __m512i ce = _mm512_loadu_si512(qx.corr.data() + ((mm * 2 + 0) * nb + b) * 16);
      const __m512i co = _mm512_loadu_si512(qx.corr.data() + ((mm * 2 + 1) * nb + b) * 16);
      const __m512 se = _mm512_set1_ps(qx.step[(mm * 2 + 0) * nb + b]);
      const __m512 so = _mm512_set1_ps(qx.step[(mm * 2 + 1) * nb + b]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m512i e = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], eh), 8);
        e = _mm512_sub_epi32(_mm512_dpbusd_epi32(e, lo[r], el), ce);
        __m512i o = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[r], oh), 8);
        o = _mm512_sub_epi32(_mm512_dpbusd_epi32(o, hi[r], ol), co);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), se, acc[r][m]);
        acc2[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(o), so, acc2[r][m]);
      }
    }
    if ((b + 1) % bpg == 0 || b + 1 == nb) {  // the end of a scale group
      const int64_t g = b / bpg;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 ws = _mm512_set1_ps(p.scales[(row0 + r) * p.ng + g]);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          tot[r][m] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][m], acc2[r][m]), ws, tot[r][m]);
          acc[r][m] = acc2[r][m] = _mm512_setzero_ps();
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) p.y[(m0 + m) * p.N + row0 + r] += _mm512_reduce_add_ps(tot[r][m]);
}

template <int M>
inline void vnni_range(const Problem& p, const QuantX& qx, int64_t r0, int64_t r1, int64_t m0) {
  constexpr int R = 1;  // one row at a time: a thread's rows stream as one sequential read (measured: 2-4 interleaved rows ran at half the bandwidth)
  int64_t r = r0;
  for (; r + R <= r1; r += R) vnni_rows<M, R>(p, qx, r, m0);
  for (; r < r1; ++r) vnni_rows<M, 1>(p, qx, r, m0);
}

inline void vnni_work(const Problem& p, const QuantX& qx, int64_t begin, int64_t end) {
  // rows in tiles of about 64 KiB, which stay in L2 while every batch chunk of x passes over them
  const int64_t tile = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, p.Ku));
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile);
    for (int64_t m0 = 0; m0 < qx.M; m0 += VNNI_MAXM) {
      switch (std::min<int64_t>(VNNI_MAXM, qx.M - m0)) {
        case 1: vnni_range<1>(p, qx, t0, t1, m0); break;
        case 2: vnni_range<2>(p, qx, t0, t1, m0); break;
        case 3: vnni_range<3>(p, qx, t0, t1, m0); break;
        default: vnni_range<4>(p, qx, t0, t1, m0); break;
      }
    }
  }
}
#else
#define GLM_I4_VNNI 0
struct QuantX {};
#endif

// ------------------------------------------------------------------------------------------
// INT8 / INT4 x 8-bit activations with integer dot products (CPUs without AVX-512 VNNI).
//
// llama.cpp's Q4_0 x Q8_0 scheme on our weight layout: x is quantized once per call, per block
// of QB = 32 weight units, to int8 x8 = round(x / step), step = absmax(block) / 127 (INT8: a
// block is 32 inputs; INT4: 32 packed bytes = 64 inputs, stored as their 32 even then 32 odd
// inputs, so the low nibbles of 32 bytes meet x8_even and the high nibbles x8_odd). Per block
// and row the dot product of the weights (INT4: the stored nibbles q + 8, then minus
// 8 * sum(x8)) with x8 is an exact integer, converted to float and scaled by the block's step;
// a group's scale multiplies its blocks' sum. The only rounding beyond the FP32 kernel's is
// x's: at most step / 2 = absmax(block) / 254 per input (the tests check the bound).
// Used for INT8 and INT4 at every batch size that reaches gemv() (decoding and prefills below
// kernels.BLAS_MIN_ROWS rows) where the 16-bit VNNI kernel above does not run and the groups are
// whole blocks (or one per row); `set_int_activations(False)` turns it off.
//
// Two kernels share the arithmetic: q8_row (one weight row at a time: decoding, small batches)
// and q8_tile (8 interleaved rows, one per 32-bit lane: from q8_tile_min_rows() rows of x).
// The ISA specifics are small helpers on 32 weight units: dot_nib / dot_u4 (packed nibbles),
// w8_prep + w8_dot / dot_s8 (int8 weights), acc_block (int32 lanes -> float, times the step),
// transpose_quads (the tile's interleave): AVX2 `maddubs` + `madd` (the sign trick for signed
// INT8), AVX-VNNI / AVX-512 VL `vpdpbusd` (INT8 stored + 128), NEON `sdot` (or `smull` +
// pairwise adds without the dot-product extension; no tile kernel there).
// ------------------------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
#define GLM_Q8 1
using vi = __m256i;  // 8 int32 lanes
using qf = __m256;   // 8 float lanes
inline vi vi_first(int32_t c) { return _mm256_setr_epi32(c, 0, 0, 0, 0, 0, 0, 0); }
inline qf qf_zero() { return _mm256_setzero_ps(); }
inline float qf_sum(qf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline qf qf_fma(qf a, float s, qf acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc); }
inline qf acc_block(vi d, float step, qf acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(step), acc); }
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
// acc + (unsigned bytes u) . (signed bytes s), in groups of 4 bytes per int32 lane
inline vi dot_us(vi acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else  // u <= 128 here (nibbles, |INT8|), so u * s + u * s <= 2 * 128 * 127 < 2^15: no saturation
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
using vq = __m256i;  // 32 bytes
inline vq load_vq(const void* p) { return load32(p); }
inline vq bcast4(const int8_t* x) {  // x[0..4) in every 4-byte lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}
inline vi vi_set1(int32_t c) { return _mm256_set1_epi32(c); }
inline vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline void split_nibbles(vq v, vq& lo, vq& hi) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, nib);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
}
// acc + lo . xl + hi . xh (nibbles 0..15 times signed bytes, 4 bytes per int32 lane)
inline vi dot_nib(vi acc, vq lo, vq hi, vq xl, vq xh) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  return dot_us(dot_us(acc, lo, xl), hi, xh);
#else  // both halves summed in 16 bits first (|sum| <= 4 * 15 * 127), then one madd
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}
// acc + sum over 32 bytes of w: (low nibble) * x[0..32) + (high nibble) * x[32..64)
inline vi dot_u4(vi acc, const uint8_t* w, const int8_t* x) {
  vq lo, hi;
  split_nibbles(load32(w), lo, hi);
  return dot_nib(acc, lo, hi, load32(x), load32(x + 32));
}
// Signed INT8 weights against signed x. With vpdpbusd: w + 128 (w xor 0x80) is unsigned, and
// the block's base (quantize_x8) subtracts 128 * sum(x8). With maddubs that would saturate its
// 16-bit pairs, so there: |w| times x with w's sign (llama.cpp's trick).
struct W8 { vq u, w; };  // a weight vector as the dot product takes it
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
constexpr int32_t W8_OFFSET = 128;
constexpr int TILE_CHAINS = 2;  // vpdpbusd's latency (4-5 cycles): two independent sums per x row
inline W8 w8_prep(vq w) { return {_mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))), w}; }
inline vi w8_dot(vi acc, const W8& w, vq x) { return dot_us(acc, w.u, x); }
#else
constexpr int32_t W8_OFFSET = 0;
constexpr int TILE_CHAINS = 1;  // (maddubs' products are independent; only their 1-cycle adds chain)
inline W8 w8_prep(vq w) { return {_mm256_sign_epi8(w, w), w}; }
inline vi w8_dot(vi acc, const W8& w, vq x) { return dot_us(acc, w.u, _mm256_sign_epi8(x, w.w)); }
#endif
// acc + w[0..32) . x[0..32), both signed
inline vi dot_s8(vi acc, const int8_t* w, const int8_t* x) { return w8_dot(acc, w8_prep(load32(w)), load32(x)); }
// out[32 q + 4 r .. + 4) = rows[r][4 q .. + 4) for 8 rows of 32 bytes: an 8 x 8 transpose of int32s
inline void transpose_quads(const int8_t* const rows[8], int8_t* out) {
  __m256i r[8];
  for (int i = 0; i < 8; ++i) r[i] = load32(rows[i]);
  const __m256i a0 = _mm256_unpacklo_epi32(r[0], r[1]), a1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i a2 = _mm256_unpacklo_epi32(r[2], r[3]), a3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i a4 = _mm256_unpacklo_epi32(r[4], r[5]), a5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i a6 = _mm256_unpacklo_epi32(r[6], r[7]), a7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i b0 = _mm256_unpacklo_epi64(a0, a2), b1 = _mm256_unpackhi_epi64(a0, a2);
  const __m256i b2 = _mm256_unpacklo_epi64(a1, a3), b3 = _mm256_unpackhi_epi64(a1, a3);
  const __m256i b4 = _mm256_unpacklo_epi64(a4, a6), b5 = _mm256_unpackhi_epi64(a4, a6);
  const __m256i b6 = _mm256_unpacklo_epi64(a5, a7), b7 = _mm256_unpackhi_epi64(a5, a7);
  const __m256i o[8] = {_mm256_permute2x128_si256(b0, b4, 0x20), _mm256_permute2x128_si256(b1, b5, 0x20),
                        _mm256_permute2x128_si256(b2, b6, 0x20), _mm256_permute2x128_si256(b3, b7, 0x20),
                        _mm256_permute2x128_si256(b0, b4, 0x31), _mm256_permute2x128_si256(b1, b5, 0x31),
                        _mm256_permute2x128_si256(b2, b6, 0x31), _mm256_permute2x128_si256(b3, b7, 0x31)};
  for (int q = 0; q < 8; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * q), o[q]);
}
// the 8-row tile kernel's float side: acc + a * s[0..8), and y[0..8) += a
inline qf qf_fmav(qf a, const float* s, qf acc) { return _mm256_fmadd_ps(a, _mm256_loadu_ps(s), acc); }
inline void qf_addto(float* y, qf a) { _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), a)); }
#define GLM_Q8_TILE 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr const char* Q8_DOT = "vpdpbusd (AVX-512 VL)";
#elif defined(__AVXVNNI__)
constexpr const char* Q8_DOT = "vpdpbusd (AVX-VNNI)";
#else
constexpr const char* Q8_DOT = "maddubs (AVX2)";
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define GLM_Q8 1
struct vi { int32x4_t a, b; };
struct qf { float32x4_t a, b; };
inline vi vi_first(int32_t c) { return {vsetq_lane_s32(c, vdupq_n_s32(0), 0), vdupq_n_s32(0)}; }
inline qf qf_zero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline float qf_sum(qf a) { return vaddvq_f32(vaddq_f32(a.a, a.b)); }
inline qf qf_fma(qf a, float s, qf acc) { return {vfmaq_n_f32(acc.a, a.a, s), vfmaq_n_f32(acc.b, a.b, s)}; }
inline qf acc_block(vi d, float step, qf acc) {
  return {vfmaq_n_f32(acc.a, vcvtq_f32_s32(d.a), step), vfmaq_n_f32(acc.b, vcvtq_f32_s32(d.b), step)};
}
inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {  // acc + a . b in groups of 4 bytes
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  const int16x8_t p = vmlal_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), vget_high_s8(a), vget_high_s8(b));
  return vpadalq_s16(acc, p);  // the same total per vector; lanes pair bytes differently
#endif
}
// nibbles q + 8 are 0..15: as signed bytes they multiply with sdot directly
inline vi dot_u4(vi acc, const uint8_t* w, const int8_t* x) {
  const uint8x16_t v0 = vld1q_u8(w), v1 = vld1q_u8(w + 16), nib = vdupq_n_u8(0x0F);
  acc.a = dot16(acc.a, vreinterpretq_s8_u8(vandq_u8(v0, nib)), vld1q_s8(x));
  acc.b = dot16(acc.b, vreinterpretq_s8_u8(vandq_u8(v1, nib)), vld1q_s8(x + 16));
  acc.a = dot16(acc.a, vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), vld1q_s8(x + 32));
  acc.b = dot16(acc.b, vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), vld1q_s8(x + 48));
  return acc;
}
inline vi dot_s8(vi acc, const int8_t* w, const int8_t* x) {
  acc.a = dot16(acc.a, vld1q_s8(w), vld1q_s8(x));
  acc.b = dot16(acc.b, vld1q_s8(w + 16), vld1q_s8(x + 16));
  return acc;
}
constexpr int32_t W8_OFFSET = 0;  // sdot multiplies signed bytes as they are
#if defined(__ARM_FEATURE_DOTPROD)  // the 8-row tile kernel needs sdot's 4 bytes per lane (smull pairs bytes differently)
struct vq { int8x16_t a, b; };
inline vq load_vq(const void* p) {
  const int8_t* q = static_cast<const int8_t*>(p);
  return {vld1q_s8(q), vld1q_s8(q + 16)};
}
inline vq bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  const int8x16_t b = vreinterpretq_s8_s32(vdupq_n_s32(v));
  return {b, b};
}
inline vi vi_set1(int32_t c) { return {vdupq_n_s32(c), vdupq_n_s32(c)}; }
inline vi vi_add(vi a, vi b) { return {vaddq_s32(a.a, b.a), vaddq_s32(a.b, b.b)}; }
constexpr int TILE_CHAINS = 2;  // sdot's latency: two independent sums per x row
inline void split_nibbles(vq v, vq& lo, vq& hi) {
  const int8x16_t nib = vdupq_n_s8(0x0F);
  lo = {vandq_s8(v.a, nib), vandq_s8(v.b, nib)};
  hi = {vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(v.a), 4)),
        vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(v.b), 4))};
}
inline vi dot_nib(vi acc, vq lo, vq hi, vq xl, vq xh) {
  return {vdotq_s32(vdotq_s32(acc.a, lo.a, xl.a), hi.a, xh.a), vdotq_s32(vdotq_s32(acc.b, lo.b, xl.b), hi.b, xh.b)};
}
struct W8 { vq w; };
inline W8 w8_prep(vq w) { return {w}; }
inline vi w8_dot(vi acc, const W8& w, vq x) { return {vdotq_s32(acc.a, w.w.a, x.a), vdotq_s32(acc.b, w.w.b, x.b)}; }
inline void transpose_quads(const int8_t* const rows[8], int8_t* out) {
  for (int q = 0; q < 8; ++q)
    for (int r = 0; r < 8; ++r) std::memcpy(out + 32 * q + 4 * r, rows[r] + 4 * q, 4);
}
inline qf qf_fmav(qf a, const float* s, qf acc) {
  return {vfmaq_f32(acc.a, a.a, vld1q_f32(s)), vfmaq_f32(acc.b, a.b, vld1q_f32(s + 4))};
}
inline void qf_addto(float* y, qf a) {
  vst1q_f32(y, vaddq_f32(vld1q_f32(y), a.a));
  vst1q_f32(y + 4, vaddq_f32(vld1q_f32(y + 4), a.b));
}
#define GLM_Q8_TILE 1
#endif
#if defined(__ARM_FEATURE_DOTPROD)
constexpr const char* Q8_DOT = "sdot (NEON)";
#else
constexpr const char* Q8_DOT = "smull (NEON)";
#endif
#else
#define GLM_Q8 0
constexpr const char* Q8_DOT = "";
constexpr int32_t W8_OFFSET = 0;
#endif
#ifndef GLM_Q8_TILE
#define GLM_Q8_TILE 0
#endif

inline std::atomic<bool>& int_act_enabled() {  // integer-activation kernels on (default) or off (exact FP32 kernels)
  static std::atomic<bool> on{true};
  return on;
}

constexpr int64_t QB = 32;   // weight units per activation block
constexpr int Q8_MAXM = 4;   // rows of x per pass over a weight row
inline std::atomic<int64_t>& q8_max_rows() {  // batch sizes it takes (larger ones: FP32 kernel / BLAS)
  static std::atomic<int64_t> rows{INT64_MAX};  // all: prefill products measured 1.2-1.5x the FP32 kernel
  return rows;
}
// AVX-512 VNNI builds: from this many rows of x, INT8 and INT4 take the 8-bit kernel (vpdpbusd on
// 256 bits), below it the INT4 x int16 VNNI kernel / the FP32 kernel for INT8. From 1 row (all of
// them): on a Zen 4, one thread, the 8-bit kernel was 1.2-2.2x the others at 1-128 rows of a
// 2752 x 1024 product, and end to end (benchmarks/decode.py) prefill 1.5-2x, decode 1.1-1.4x
// (docs/inference.md). GLM130B_Q8_MIN_ROWS sets it (a large number: the previous kernels).
constexpr int64_t Q8_MIN_ROWS_VNNI = 1;
inline std::atomic<int64_t>& q8_min_rows() {
  static std::atomic<int64_t> rows{Q8_MIN_ROWS_VNNI};
  return rows;
}

struct Q8X {  // one call's x in blocks of QB units
  int64_t M = 0, nb = 0, bytes = 0;  // bytes of x per block: INT8 32, INT4 64 (32 even, 32 odd inputs)
  std::vector<int8_t> q;           // [M][nb][bytes]
  std::vector<float> step;         // [M][nb]
  std::vector<int32_t> base;       // [M][nb]: -offset * sum(x8) for weights stored + offset (INT4: 8; INT8: W8_OFFSET)
  const int8_t* block(int64_t m, int64_t b) const { return q.data() + (m * nb + b) * bytes; }
};

inline bool q8_fits(const Problem& p) { return p.Gu == p.Ku || p.Gu % QB == 0; }

// One block of n = 32 or 64 inputs v (in the kernel's order) to int8 q = round(v / step),
// step = absmax / 127 (round half to even, as nearbyint); returns the step, and the sum of q.
inline float quantize_block(const float* v, int n, int8_t* q, int32_t& sum) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(v + i), absmask));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < n; i += 32) {
    __m256i r[4];
    for (int j = 0; j < 4; ++j) {  // the current rounding mode: to nearest even
      r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inv));
      total = _mm256_add_epi32(total, r[j]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  sum = _mm_cvtsi128_si32(t);
  return amax / 127.f;
#else
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  sum = 0;
  for (int i = 0; i < n; ++i) {
    q[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(v[i] * inv))));
    sum += q[i];
  }
  return amax / 127.f;
#endif
}

inline void quantize_x8(const float* x, int64_t M, int64_t K, int64_t Ku, int fmt, Q8X& qx) {
  const bool i4 = fmt == I4;
  qx.M = M;
  qx.nb = (Ku + QB - 1) / QB;
  qx.bytes = i4 ? 2 * QB : QB;
  qx.q.resize(static_cast<size_t>(M * qx.nb * qx.bytes));  // every byte is written below
  qx.step.resize(static_cast<size_t>(M * qx.nb));
  qx.base.resize(static_cast<size_t>(M * qx.nb));
  alignas(32) float v[2 * QB];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < qx.nb; ++b) {
      // the block's inputs in the order the kernel reads them (INT4: 32 even, then 32 odd), zero past K
      const int64_t k0 = b * QB * (i4 ? 2 : 1);
      const float* xr = x + m * K;
      const float* src = v;
      if (k0 + qx.bytes <= K) {
        if (i4)
          for (int64_t i = 0; i < QB; ++i) {
            v[i] = xr[k0 + 2 * i];
            v[QB + i] = xr[k0 + 2 * i + 1];
          }
        else
          src = xr + k0;
      } else {
        for (int64_t i = 0; i < qx.bytes; ++i) {
          const int64_t k = i4 ? k0 + 2 * (i % QB) + i / QB : k0 + i;
          v[i] = k < K ? xr[k] : 0.f;
        }
      }
      int32_t sum = 0;
      const int64_t mb = m * qx.nb + b;
      qx.step[mb] = quantize_block(src, static_cast<int>(qx.bytes), qx.q.data() + mb * qx.bytes, sum);
      qx.base[mb] = i4 ? -8 * sum : -W8_OFFSET * sum;
    }
}

#if GLM_Q8
// One weight row against x rows [m0, m0 + M): y += W x over all units (scales per group).
template <int FMT, int M>
inline void q8_row(const Problem& p, const Q8X& qx, int64_t row, int64_t m0) {
  using T = typename Unit<FMT>::T;
  const T* w = static_cast<const T*>(p.w) + row * p.Ku;
  const int64_t nb = qx.nb, bpg = p.Gu == p.Ku ? nb : p.Gu / QB;  // blocks per scale group
  alignas(32) T tail[QB];  // the row's last, partial block (x is zero past the row)
  qf tot[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) tot[m] = qf_zero();
  for (int64_t g0 = 0; g0 < nb; g0 += bpg) {
    const int64_t g1 = std::min(nb, g0 + bpg);
    qf acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = qf_zero();
    for (int64_t b = g0; b < g1; ++b) {
      const int64_t j = b * QB;
      if ((j & 63) == 0) prefetch_row(w, j);
      const T* wb = w + j;
      if (j + QB > p.Ku) {
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, wb, sizeof(T) * (p.Ku - j));
        wb = tail;
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int64_t mb = (m0 + m) * nb + b;
        vi d;
        if constexpr (FMT == I4) d = dot_u4(vi_first(qx.base[mb]), wb, qx.block(m0 + m, b));
        else d = dot_s8(vi_first(qx.base[mb]), wb, qx.block(m0 + m, b));
        acc[m] = acc_block(d, qx.step[mb], acc[m]);
      }
    }
    const float s = p.scales[row * p.ng + g0 / bpg];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) tot[m] = qf_fma(acc[m], s, tot[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) p.y[(m0 + m) * p.N + row] += qf_sum(tot[m]);
}

#if GLM_Q8_TILE
// The same products for 8 weight rows at once, for prefills and larger batches (from
// q8_tile_min_rows() rows of x). The row kernel above spends most of its instructions per
// (row, block, x row) outside the dot product: the int32 -> float conversion, the step's
// multiply, the horizontal sum. Here each 32-bit lane of a vector holds one of 8 weight rows
// (4 of its bytes), x's 4 bytes are broadcast to all lanes, so one conversion and one multiply
// serve 8 rows, and each x row's 8 outputs are one vector store. That needs the 8 rows'
// bytes interleaved 4 at a time (llama.cpp repacks its weights so at load time); here a tile
// of 8 rows is interleaved into a scratch buffer per call, a cost shared by all rows of x,
// so the stored layout stays the canonical one.
constexpr int TR = 8;        // weight rows per tile: one per 32-bit lane of 32 bytes
constexpr int TILE_MAXM = 4;  // rows of x per pass over a tile (6 or 8 measured no faster on a Zen 4)
inline std::atomic<int64_t>& q8_tile_min_rows() {
  static std::atomic<int64_t> rows{8};
  return rows;
}

// rows [r0, r0 + 8) of the weight as tiles: for block b and 4-byte quad q (of QB = 32 bytes),
// the quads of the 8 rows side by side at out[(b * 8 + q) * 32 + 4 * row]; zeros past the row
// (x is zero there too). Scales as sc[group * 8 + row].
constexpr int64_t PF_TILES = 2;  // how many tiles ahead pack_tile prefetches
inline void pack_tile(const Problem& p, int64_t r0, int64_t nb, int8_t* out, float* sc) {
  static_assert(TR == 8 && QB == 32, "transpose_quads moves 8 rows of 32 bytes");
  const int8_t* src = static_cast<const int8_t*>(p.w) + r0 * p.Ku;  // INT8 and INT4 units are bytes
  const int64_t full = p.Ku / QB;  // blocks with all their bytes in the row
  // Reading 8 rows a block at a time is 8 interleaved streams, which the hardware prefetchers
  // follow at about half the bandwidth of one (measured: 8 against 16 GB/s from DRAM), so the
  // tile PF_TILES ahead, contiguous, is prefetched as one stream meanwhile.
  const int64_t ahead = r0 + (1 + PF_TILES) * TR <= p.N ? PF_TILES * TR * p.Ku : 0;
  const int8_t* rows[TR];
  for (int64_t b = 0; b < full; ++b) {
    for (int r = 0; r < TR; ++r) rows[r] = src + r * p.Ku + b * QB;
    if (ahead)
      for (int64_t line = b * QB * TR; line < (b + 1) * QB * TR; line += 64) prefetch_line(src + ahead + line);
    transpose_quads(rows, out + b * QB * TR);
  }
  if (full < nb) {  // the rows' last, partial block, zero-padded
    int8_t part[TR][QB] = {};
    for (int r = 0; r < TR; ++r) {
      std::memcpy(part[r], src + r * p.Ku + full * QB, static_cast<size_t>(p.Ku - full * QB));
      rows[r] = part[r];
    }
    transpose_quads(rows, out + full * QB * TR);
  }
  for (int r = 0; r < TR; ++r)
    for (int64_t g = 0; g < p.ng; ++g) sc[g * TR + r] = p.scales[(r0 + r) * p.ng + g];
}

// y[m0 .. m0 + M)[r0 .. r0 + 8) += the tile's rows times x rows m0 .. m0 + M.
template <int FMT, int M>
inline void q8_tile(const Problem& p, const Q8X& qx, const int8_t* tile, const float* sc, int64_t r0, int64_t m0) {
  const int64_t nb = qx.nb, bpg = p.Gu == p.Ku ? nb : p.Gu / QB;
  qf tot[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) tot[m] = qf_zero();
  for (int64_t g0 = 0; g0 < nb; g0 += bpg) {
    const int64_t g1 = std::min(nb, g0 + bpg);
    qf acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = qf_zero();
    for (int64_t b = g0; b < g1; ++b) {
      const int8_t* wb = tile + b * QB * TR;
      const int8_t* xb[M];
      vi d[TILE_CHAINS][M];  // independent sums (quads q % TILE_CHAINS), so dot products overlap
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        xb[m] = qx.block(m0 + m, b);
        d[0][m] = vi_set1(qx.base[(m0 + m) * nb + b]);
#pragma GCC unroll 4
        for (int c = 1; c < TILE_CHAINS; ++c) d[c][m] = vi_set1(0);
      }
#pragma GCC unroll 8
      for (int q = 0; q < QB / 4; ++q) {
        const vq w = load_vq(wb + q * 4 * TR);
        vi* dc = d[q % TILE_CHAINS];
        if constexpr (FMT == I4) {  // low nibbles meet x's even inputs, high ones its odd ones (Q8X)
          vq lo, hi;
          split_nibbles(w, lo, hi);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) dc[m] = dot_nib(dc[m], lo, hi, bcast4(xb[m] + 4 * q), bcast4(xb[m] + QB + 4 * q));
        } else {
          const W8 w8 = w8_prep(w);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) dc[m] = w8_dot(dc[m], w8, bcast4(xb[m] + 4 * q));
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
        for (int c = 1; c < TILE_CHAINS; ++c) d[0][m] = vi_add(d[0][m], d[c][m]);
        acc[m] = acc_block(d[0][m], qx.step[(m0 + m) * nb + b], acc[m]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) tot[m] = qf_fmav(acc[m], sc + (g0 / bpg) * TR, tot[m]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) qf_addto(p.y + (m0 + m) * p.N + r0, tot[m]);
}
#endif

template <int FMT>
inline void q8_work(const Problem& p, const Q8X& qx, int64_t begin, int64_t end) {
#if GLM_Q8_TILE
  if (qx.M >= q8_tile_min_rows().load()) {
    thread_local std::vector<int8_t> tile;
    thread_local std::vector<float> sc;
    tile.resize(static_cast<size_t>(qx.nb * QB * TR));
    sc.resize(static_cast<size_t>(p.ng * TR));
    for (; begin + TR <= end; begin += TR) {
      pack_tile(p, begin, qx.nb, tile.data(), sc.data());
      for (int64_t m0 = 0; m0 < qx.M; m0 += TILE_MAXM) switch (std::min<int64_t>(TILE_MAXM, qx.M - m0)) {
          case 1: q8_tile<FMT, 1>(p, qx, tile.data(), sc.data(), begin, m0); break;
          case 2: q8_tile<FMT, 2>(p, qx, tile.data(), sc.data(), begin, m0); break;
          case 3: q8_tile<FMT, 3>(p, qx, tile.data(), sc.data(), begin, m0); break;
          default: q8_tile<FMT, 4>(p, qx, tile.data(), sc.data(), begin, m0); break;
        }
    }  // the last rows (fewer than a tile): the row kernel below
  }
#endif
  // rows in tiles of about 64 KiB, which stay in L2 while every batch chunk of x passes over them
  const int64_t tile = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, p.Ku));
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile);
    for (int64_t m0 = 0; m0 < qx.M; m0 += Q8_MAXM)
      for (int64_t r = t0; r < t1; ++r) switch (std::min<int64_t>(Q8_MAXM, qx.M - m0)) {
          case 1: q8_row<FMT, 1>(p, qx, r, m0); break;
          case 2: q8_row<FMT, 2>(p, qx, r, m0); break;
          case 3: q8_row<FMT, 3>(p, qx, r, m0); break;
          default: q8_row<FMT, 4>(p, qx, r, m0); break;
        }
  }
}
#endif  // GLM_Q8

struct Scratch {  // per-call buffers of gemv(), reusable across calls
  std::vector<float> xs;
  QuantX qx;
  Q8X q8;
};

// Which integer-activation kernel (if any) takes this product: the 8-bit one for INT8 / INT4
// (with AVX-512 VNNI from q8_min_rows() rows of x; below that the 16-bit VNNI one for INT4).
enum IntKernel { NONE, VNNI16, Q8 };
inline IntKernel int_kernel(const Problem& p, int fmt, int64_t M) {
  if ((fmt != I4 && fmt != I8) || !int_act_enabled()) return NONE;
  const bool q8 = GLM_Q8 && M <= q8_max_rows().load() && q8_fits(p);
#if GLM_I4_VNNI
  if (q8 && M >= q8_min_rows().load()) return Q8;  // (by default every batch: see q8_min_rows)
  if (fmt == I4) return vnni_fits(p) ? VNNI16 : NONE;
  return NONE;  // INT8 below q8_min_rows: the FP32 kernel
#else
  return q8 ? Q8 : NONE;
#endif
}

// p.y [M, N] = x[M, K] @ W^T + bias (p.bias, or none): prepares x for the kernel that takes
// this weight (an integer-activation kernel, or the FP32 kernels) and runs it.
inline void gemv(Problem p, const float* x, int64_t M, int64_t K, int fmt, int64_t threads, Scratch& s) {
  for (int64_t m = 0; m < M; ++m) {  // the kernels add their products to y
    if (p.bias) std::memcpy(p.y + m * p.N, p.bias, sizeof(float) * p.N);
    else std::fill(p.y + m * p.N, p.y + (m + 1) * p.N, 0.f);
  }
  if (M == 0 || p.N == 0) return;
  const IntKernel ik = int_kernel(p, fmt, M);
#if GLM_I4_VNNI
  if (ik == VNNI16) {
    quantize_x(x, M, K, p.Ku, s.qx);
    split_rows(p.N, p.N * p.Ku * 2 * M, threads, [&](int64_t a, int64_t b) { vnni_work(p, s.qx, a, b); });
    return;
  }
#endif
#if GLM_Q8
  if (ik == Q8) {
    quantize_x8(x, M, K, p.Ku, fmt, s.q8);
    split_rows(p.N, p.N * p.Ku * (fmt == I4 ? 2 : 1) * M, threads, [&](int64_t a, int64_t b) {
      if (fmt == I4) q8_work<I4>(p, s.q8, a, b);
      else q8_work<I8>(p, s.q8, a, b);
    });
    return;
  }
#endif
  (void)ik;
  p.xstride = x_stride(fmt, M, K, p.Ku);
  s.xs.resize(static_cast<size_t>(M * p.xstride));
  prepare_x(x, M, K, p.Ku, fmt, s.xs.data(), p.xstride);
  p.xs = s.xs.data();
  gemv_run(p, M, fmt, threads);
}

}  // namespace glm
