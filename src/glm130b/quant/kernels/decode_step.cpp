// One decode step of a whole GLM stack on the CPU, in one call from Python (and, with several
// tokens per row, the prefill of short contexts).
//
// At batch 1 a decode step reads every weight once; the matrix products (gemv.h) run at memory
// speed, and in eager PyTorch the ~25 small operations around them per layer (LayerNorms,
// rotary, the cache write, attention for one query, GeGLU, the DeepNorm residual) cost more
// than the products of a small model: about 2 ms per token for the benchmark's 8 layers. Here
// the same math runs as plain loops over the FP32 activations, with no dispatch, no
// allocation per op and no Python in between: the embedding row, then for each layer
//
//   x = LN1(h); qkv = x W_qkv + b; rotary(q, k); cache[slot] = (k, v);
//   a = softmax(q K^T / sqrt(d), masked) V W_o + b;   h = alpha * x + a     (Pre-LN: h + a)
//   m = LN2(h); u = m W_up + b; g = u_a * gelu(u_b);  h = alpha * m + g W_down + b  (Pre-LN: h + ...)
//
// then the final LayerNorm and the output head. It is the model's forward for a few tokens per
// row (glm130b/model/*.py is the readable version and the reference in the tests), written
// against the KV cache the PyTorch prefill filled, so the two paths share one cache.
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "gemv.h"

namespace {
using namespace glm;

// One matrix as the GEMV reads it; holds its tensors so the pointers stay valid.
struct Weight {
  at::Tensor w, scales, bias;
  int fmt = F32;
  int64_t K = 0, N = 0;
  Problem p{};

  Weight(at::Tensor w_, c10::optional<at::Tensor> scales_, int64_t group_size, c10::optional<at::Tensor> bias_,
         int64_t fmt_, int64_t K_)
      : w(std::move(w_)), fmt(static_cast<int>(fmt_)), K(K_) {
    TORCH_CHECK(w.device().is_cpu(), "the fused decode step takes CPU weights");
    if (scales_.has_value()) scales = scales_->contiguous();
    if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
    p = weight_problem(w, scales.defined() ? c10::optional<at::Tensor>(scales) : c10::nullopt, group_size,
                       bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt, fmt, K);
    N = p.N;
  }

  // y[M, N] = x[M, K] @ W^T + bias.
  void apply(const float* x, int64_t M, float* y, Scratch& scratch, int64_t threads) const {
    Problem q = p;
    q.y = y;
    gemv(q, x, M, K, fmt, threads, scratch);
  }
};
using WeightPtr = std::shared_ptr<Weight>;

struct Norm {
  at::Tensor w, b;
  // out[H] = (x - mean) / sqrt(var + eps) * w + b  (biased variance, as nn.LayerNorm)
  void apply(const float* x, float* out, int64_t H, float eps) const {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < H; ++i) mean += x[i];
    mean /= static_cast<double>(H);
    for (int64_t i = 0; i < H; ++i) {
      const double d = x[i] - mean;
      var += d * d;
    }
    var /= static_cast<double>(H);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float mu = static_cast<float>(mean);
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    for (int64_t i = 0; i < H; ++i) out[i] = (x[i] - mu) * rstd * wp[i] + bp[i];
  }
};

Norm make_norm(const at::Tensor& w, const at::Tensor& b, int64_t H) {
  TORCH_CHECK(w.device().is_cpu() && b.device().is_cpu(), "the fused decode step takes CPU weights");
  TORCH_CHECK(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && w.numel() == H && b.numel() == H,
              "LayerNorm weight and bias must be FP32 [hidden]");
  return Norm{w.contiguous(), b.contiguous()};
}

struct Layer {
  Norm ln1, ln2;
  WeightPtr qkv, dense, up, down;
};

// The KV cache holds FP32 or FP16 (uint16_t bits) values; attention math is FP32 either way.
inline vf load_kv(const float* p) { return vload(p); }
inline vf load_kv(const uint16_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__) && defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
#else
  return c10::detail::fp16_ieee_to_fp32_value(*p);
#endif
}
inline float kv_value(float v) { return v; }
inline float kv_value(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
inline void store_kv(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
// Round to nearest even, as .to(float16), after clamping to FP16's finite range (as
// model/kv_cache.py's fit_cache: an overflow would be inf, and the row's attention NaN).
inline void store_kv(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = c10::detail::fp16_ieee_from_fp32_value(std::max(-65504.f, std::min(65504.f, src[i])));
}

template <typename C>
inline float dot(const float* a, const C* b, int64_t n) {
  vf acc = vzero();
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) acc = vfma(vload(a + i), load_kv(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * kv_value(b[i]);
  return s;
}

template <typename C>
inline void axpy(float s, const C* x, float* y, int64_t n) {  // y += s * x
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 sv = _mm512_set1_ps(s);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(sv, load_kv(x + i), _mm512_loadu_ps(y + i)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 sv = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(sv, load_kv(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += s * kv_value(x[i]);
}

// exp and erf over arrays, vectorised: exp by range reduction to 2^n * exp(r), |r| <= ln2/2,
// with Cephes' degree-6 polynomial (about 1 ulp); erf by Abramowitz & Stegun 7.1.26 (absolute
// error <= 1.5e-7), the formula of PyTorch's own vectorised erf. One generic version on vf; the
// ISA specifics are the helpers below (AVX-512, AVX2, NEON, or scalar floats).
#if defined(__AVX512F__)
inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vabs(vf a) { return _mm512_abs_ps(a); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vldexp(vf y, vf n) { return _mm512_scalef_ps(y, n); }  // y * 2^n, n integral
inline vf vkeep_ge(vf v, vf x, vf lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), v); }
inline vf vcopysign(vf v, vf x) { return _mm512_or_ps(v, _mm512_and_ps(x, _mm512_set1_ps(-0.f))); }  // v >= 0
#elif defined(__AVX2__) && defined(__FMA__)
inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vldexp(vf y, vf n) {  // n in [-126, 127]: 2^n built in the exponent field
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline vf vkeep_ge(vf v, vf x, vf lo) { return _mm256_and_ps(v, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)); }
inline vf vcopysign(vf v, vf x) { return _mm256_or_ps(v, _mm256_and_ps(x, _mm256_set1_ps(-0.f))); }
#elif defined(__ARM_NEON) && defined(__aarch64__)
inline void vstore(float* p, vf a) { vst1q_f32(p, a); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf vabs(vf a) { return vabsq_f32(a); }
inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
inline vf vround(vf a) { return vrndnq_f32(a); }
inline vf vldexp(vf y, vf n) {
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(y, vreinterpretq_f32_s32(e));
}
inline vf vkeep_ge(vf v, vf x, vf lo) { return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vcgeq_f32(x, lo))); }
inline vf vcopysign(vf v, vf x) { return vbslq_f32(vdupq_n_u32(0x80000000u), x, v); }
#else
inline void vstore(float* p, vf a) { *p = a; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmin(vf a, vf b) { return std::min(a, b); }
inline vf vmax(vf a, vf b) { return std::max(a, b); }
inline vf vabs(vf a) { return std::fabs(a); }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vround(vf a) { return std::nearbyint(a); }
inline vf vldexp(vf y, vf n) { return std::ldexp(y, static_cast<int>(n)); }
inline vf vkeep_ge(vf v, vf x, vf lo) { return x >= lo ? v : 0.f; }
inline vf vcopysign(vf v, vf x) { return std::copysign(v, x); }
#endif

inline vf vexp(vf x) {
  const vf lo = vset1(-87.33654f);  // below: exp underflows to 0 (and -inf -> 0)
  const vf live_x = x;
  x = vmin(vmax(x, lo), vset1(LANES == 16 ? 88.37626f : 88.0f));  // 2^n in the exponent field needs n <= 127
  const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf y = vset1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = vfma(y, r, vset1(c));
  y = vfma(y, vmul(r, r), vadd(r, vset1(1.f)));
  return vkeep_ge(vldexp(y, n), live_x, lo);
}
inline vf verf(vf x) {
  const vf one = vset1(1.f);
  const vf a = vabs(x);
  const vf t = vdiv(one, vfma(vset1(0.3275911f), a, one));
  vf r = vset1(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) r = vfma(r, t, vset1(c));
  const vf e = vexp(vsub(vzero(), vmul(x, x)));
  const vf v = vfma(vmul(r, t), vsub(vzero(), e), one);  // 1 - r t exp(-x^2)
  return vcopysign(v, x);  // the sign of x
}

inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
  if constexpr (LANES > 1)
    for (; i + LANES <= n; i += LANES) vstore(x + i, vexp(vload(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// g[i] = gelu(z[i]) (exact erf form, or the tanh approximation), times a[i] when a is given (GeGLU).
inline void gelu(const float* z, const float* a, float* g, int64_t n, bool tanh_form) {
  int64_t i = 0;
  if constexpr (LANES > 1)
    if (!tanh_form)
      for (; i + LANES <= n; i += LANES) {
        const vf v = vload(z + i);
        const vf e = verf(vmul(v, vset1(0.7071067811865476f)));
        vf out = vmul(vmul(vset1(0.5f), v), vadd(vset1(1.f), e));
        if (a) out = vmul(out, vload(a + i));
        vstore(g + i, out);
      }
  for (; i < n; ++i) {
    const float v = z[i];
    const float gv = tanh_form ? 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))
                               : 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
    g[i] = a ? a[i] * gv : gv;
  }
}

// GPT-NeoX rotate_half rotary on x[0, 2*half): pairs i and i + half, angle table cs/sn [half].
inline void rotate(float* x, const float* cs, const float* sn, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cs[i] - x2 * sn[i];
    x[i + half] = x2 * cs[i] + x1 * sn[i];
  }
}

class DecodeStack {
 public:
  DecodeStack(int64_t hidden, int64_t heads, int64_t ffn, bool geglu, bool gelu_tanh, bool rotary_2d,
              const at::Tensor& inv_freq, double eps, double alpha, bool pre_ln)
      : H_(hidden), nh_(heads), d_(hidden / heads), F_(ffn), geglu_(geglu), gelu_tanh_(gelu_tanh),
        two_d_(rotary_2d), eps_(static_cast<float>(eps)), alpha_(static_cast<float>(alpha)), pre_ln_(pre_ln) {
    TORCH_CHECK(heads > 0 && hidden % heads == 0 && d_ % 2 == 0, "bad heads / hidden");
    TORCH_CHECK(inv_freq.scalar_type() == at::kFloat, "inv_freq must be FP32");
    const int64_t rot = two_d_ ? d_ / 2 : d_;
    TORCH_CHECK(inv_freq.numel() == rot / 2, "inv_freq has ", inv_freq.numel(), " entries; expected ", rot / 2);
    const at::Tensor f = inv_freq.contiguous();
    inv_freq_.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  }

  void add_layer(const at::Tensor& ln1_w, const at::Tensor& ln1_b, WeightPtr qkv, WeightPtr dense,
                 const at::Tensor& ln2_w, const at::Tensor& ln2_b, WeightPtr up, WeightPtr down) {
    TORCH_CHECK(qkv->K == H_ && qkv->N == 3 * H_, "query_key_value must be [3H, H]");
    TORCH_CHECK(dense->K == H_ && dense->N == H_, "dense must be [H, H]");
    TORCH_CHECK(up->K == H_ && up->N == (geglu_ ? 2 : 1) * F_, "dense_h_to_4h has the wrong shape");
    TORCH_CHECK(down->K == F_ && down->N == H_, "dense_4h_to_h has the wrong shape");
    layers_.push_back(Layer{make_norm(ln1_w, ln1_b, H_), make_norm(ln2_w, ln2_b, H_), std::move(qkv),
                            std::move(dense), std::move(up), std::move(down)});
  }

  // The embedding table (FP32 or BF16 [V, H]), the final LayerNorm and the output head.
  void set_output(const at::Tensor& embedding, const at::Tensor& final_w, const at::Tensor& final_b, WeightPtr head) {
    TORCH_CHECK(embedding.device().is_cpu(), "the fused decode step takes CPU weights");
    TORCH_CHECK(embedding.dim() == 2 && embedding.size(1) == H_ && embedding.is_contiguous() &&
                    (embedding.scalar_type() == at::kFloat || embedding.scalar_type() == at::kBFloat16),
                "the embedding must be contiguous FP32 or BF16 [V, H]");
    TORCH_CHECK(head->K == H_, "the output head must take H inputs");
    embedding_ = embedding;
    final_ = make_norm(final_w, final_b, H_);
    head_ = std::move(head);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // L tokens per row (L = 1: a decode step; more: a short prefill): ids [B, L] (int64),
  // positions [B, L] (1D) or [B, L, 2] (2D); k/v: each layer's FP32 or FP16 cache
  // [>= B rows, nh, max_len, d], of which rows [0, B) are used; token i of row b writes its key
  // and value at slot slots[b] + i (int64 [B]) and attends the slots j < T where
  // allowed[b, i, j] (B x L x T booleans; every row's L keys are written before any attends).
  // Returns FP32 logits [B, V] of token logits_at[b] of each row (undefined when logits_at is).
  at::Tensor step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& allowed,
                  const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                  const at::Tensor& slots, int64_t T, const c10::optional<at::Tensor>& logits_at,
                  int64_t threads) const {
    TORCH_CHECK(head_ && num_layers() > 0, "the stack is incomplete");
    TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids must be int64 [B, L]");
    for (const at::Tensor* t : {&ids, &positions, &allowed, &slots})
      TORCH_CHECK(t->device().is_cpu(), "the fused decode step takes CPU tensors");
    for (const auto* caches : {&k_cache, &v_cache})
      for (const at::Tensor& c : *caches) TORCH_CHECK(c.device().is_cpu(), "the fused decode step takes CPU caches");
    const int64_t B = ids.size(0), L = ids.size(1), R = B * L;  // R token rows
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                    positions.numel() == R * (two_d_ ? 2 : 1),
                "positions must be int64 [B, L]", two_d_ ? " x 2" : "");
    TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.is_contiguous() && allowed.numel() == R * T,
                "allowed must be contiguous bool with B x L x T entries");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B,
                "slots must be int64 [B]");
    const int64_t* slot_of = slots.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(0 <= slot_of[b] && slot_of[b] + L <= T, "write slots outside [0, T)");
    const int64_t* pick = nullptr;
    if (logits_at.has_value() && logits_at->defined()) {
      TORCH_CHECK(logits_at->scalar_type() == at::kLong && logits_at->is_contiguous() && logits_at->numel() == B &&
                      logits_at->device().is_cpu(), "logits_at must be int64 [B]");
      pick = logits_at->data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= pick[b] && pick[b] < L, "logits_at outside the row");
    }
    TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == num_layers() &&
                    static_cast<int64_t>(v_cache.size()) == num_layers(), "one K and one V cache per layer");
    for (const auto* caches : {&k_cache, &v_cache})
      for (const at::Tensor& c : *caches)
        TORCH_CHECK((c.scalar_type() == at::kFloat || c.scalar_type() == at::kHalf) &&
                        c.scalar_type() == k_cache[0].scalar_type() && c.is_contiguous() && c.dim() == 4 &&
                        c.size(0) >= B && c.size(1) == nh_ && c.size(3) == d_ && c.size(2) >= T && T >= 1,
                    "each cache must be contiguous FP32 or FP16 [>= B, heads, max_len >= T, head_dim]");
    const int64_t V = embedding_.size(0);
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(0 <= id[r] && id[r] < V, "token id ", id[r], " out of range");

    const int64_t H = H_, d = d_, nh = nh_, F = F_;
    std::vector<float> h(R * H), x(R * H), qkv(R * 3 * H), ctx(R * H), a(R * H), m(R * H),
        u(R * (geglu_ ? 2 : 1) * F), g(R * F);
    Scratch xs;
    // the embedding rows
    for (int64_t b = 0; b < R; ++b) {
      if (embedding_.scalar_type() == at::kFloat) {
        std::memcpy(&h[b * H], embedding_.data_ptr<float>() + id[b] * H, sizeof(float) * H);
      } else {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(embedding_.data_ptr<at::BFloat16>()) + id[b] * H;
        for (int64_t i = 0; i < H; ++i) h[b * H + i] = scalar_of(e[i]);
      }
    }
    // rotary angle tables of each row: [B][parts][half], parts = 2 for 2D (positions, block positions)
    const int64_t half = static_cast<int64_t>(inv_freq_.size()), parts = two_d_ ? 2 : 1;
    std::vector<float> cs(R * parts * half), sn(R * parts * half);
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < R; ++b)
      for (int64_t p = 0; p < parts; ++p) {
        const float t = static_cast<float>(pos[b * parts + p]);
        for (int64_t i = 0; i < half; ++i) {
          const float angle = t * inv_freq_[i];
          cs[(b * parts + p) * half + i] = std::cos(angle);
          sn[(b * parts + p) * half + i] = std::sin(angle);
        }
      }
    const bool* allow = allowed.data_ptr<bool>();

    for (int64_t l = 0; l < num_layers(); ++l) {
      const Layer& Ly = layers_[l];
      for (int64_t b = 0; b < R; ++b) Ly.ln1.apply(&h[b * H], &x[b * H], H, eps_);
      Ly.qkv->apply(x.data(), R, qkv.data(), xs, threads);
      // rotary on q and k of each head (the official per-head [q | k | v] rows)
      for (int64_t b = 0; b < R; ++b)
        for (int64_t hd = 0; hd < nh; ++hd) {
          float* q = &qkv[b * 3 * H + hd * 3 * d];
          for (float* v : {q, q + d})
            for (int64_t p = 0; p < parts; ++p)
              rotate(v + p * 2 * half, &cs[(b * parts + p) * half], &sn[(b * parts + p) * half], half);
        }
      if (k_cache[l].scalar_type() == at::kFloat)
        attention<float>(qkv.data(), k_cache[l], v_cache[l], slot_of, L, allow, R, T, ctx.data(), threads);
      else
        attention<uint16_t>(qkv.data(), k_cache[l], v_cache[l], slot_of, L, allow, R, T, ctx.data(), threads);
      Ly.dense->apply(ctx.data(), R, a.data(), xs, threads);
      for (int64_t i = 0; i < R * H; ++i) h[i] = (pre_ln_ ? h[i] : alpha_ * x[i]) + a[i];
      for (int64_t b = 0; b < R; ++b) Ly.ln2.apply(&h[b * H], &m[b * H], H, eps_);
      Ly.up->apply(m.data(), R, u.data(), xs, threads);
      const int64_t width = geglu_ ? 2 * F : F;
      for (int64_t b = 0; b < R; ++b) {  // GeGLU: u = [a | b] -> a * gelu(b); GELU: gelu(u)
        const float* ub = &u[b * width];
        gelu(geglu_ ? ub + F : ub, geglu_ ? ub : nullptr, &g[b * F], F, gelu_tanh_);
      }
      Ly.down->apply(g.data(), R, a.data(), xs, threads);
      for (int64_t i = 0; i < R * H; ++i) h[i] = (pre_ln_ ? h[i] : alpha_ * m[i]) + a[i];
    }
    if (!pick) return at::Tensor();
    for (int64_t b = 0; b < B; ++b) final_.apply(&h[(b * L + pick[b]) * H], &x[b * H], H, eps_);
    at::Tensor out = at::empty({B, head_->N}, at::TensorOptions().dtype(at::kFloat));
    head_->apply(x.data(), B, out.data_ptr<float>(), xs, threads);
    return out;
  }

  // Write each row's new key and value at its slot of the cache (C: float or FP16 bits), then
  // attend: ctx[b, head] = softmax_j(q . k_j / sqrt(d), allowed slots j < T) v_j, in FP32.
  template <typename C>
  void attention(const float* qkv, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* slot_of,
                 int64_t L, const bool* allow, int64_t R, int64_t T, float* ctx, int64_t threads) const {
    const int64_t H = H_, d = d_, nh = nh_, max_len = k_cache.size(2);
    C* kc = static_cast<C*>(k_cache.data_ptr());
    C* vc = static_cast<C*>(v_cache.data_ptr());
    for (int64_t r = 0; r < R; ++r)  // token row r = token r % L of cache row r / L
      for (int64_t hd = 0; hd < nh; ++hd) {
        const float* q = qkv + r * 3 * H + hd * 3 * d;
        const int64_t slot = (((r / L) * nh + hd) * max_len + slot_of[r / L] + r % L) * d;
        store_kv(kc + slot, q + d, d);
        store_kv(vc + slot, q + 2 * d, d);
      }
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    auto attend = [&](int64_t pair, std::vector<float>& score) {
      const int64_t r = pair / nh, hd = pair % nh, b = r / L;
      const float* q = qkv + r * 3 * H + hd * 3 * d;
      const C* K = kc + (b * nh + hd) * max_len * d;
      const C* V = vc + (b * nh + hd) * max_len * d;
      const bool* ok = allow + r * T;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < T; ++j) {
        score[j] = ok[j] ? dot(q, K + j * d, d) * scale : -std::numeric_limits<float>::infinity();
        mx = std::max(mx, score[j]);
      }
      float* out = ctx + r * H + hd * d;
      std::fill(out, out + d, 0.f);
      if (mx == -std::numeric_limits<float>::infinity()) return;  // no visible slot (SDPA gives NaN)
      for (int64_t j = 0; j < T; ++j) score[j] -= mx;  // masked slots stay -inf: exp gives 0
      exp_inplace(score.data(), T);
      float sum = 0.f;
      for (int64_t j = 0; j < T; ++j) sum += score[j];
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < T; ++j)
        if (score[j] != 0.f) axpy(score[j] * inv, V + j * d, out, d);
    };
    const int64_t pairs = R * nh;
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({threads, pairs, (pairs * T * d) >> 15}));
    if (nt == 1) {
      std::vector<float> score(T);
      for (int64_t i = 0; i < pairs; ++i) attend(i, score);
      return;
    }
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      std::vector<float> score(T);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < pairs; ++i) attend(i, score);
    }
  }

 private:
  int64_t H_, nh_, d_, F_;
  bool geglu_, gelu_tanh_, two_d_;
  float eps_, alpha_;
  bool pre_ln_;
  std::vector<float> inv_freq_;
  std::vector<Layer> layers_;
  at::Tensor embedding_;
  Norm final_;
  WeightPtr head_;
};

}  // namespace

void register_decode_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Weight, WeightPtr>(m, "DecodeWeight")
      .def(py::init<at::Tensor, c10::optional<at::Tensor>, int64_t, c10::optional<at::Tensor>, int64_t, int64_t>(),
           py::arg("w"), py::arg("scales"), py::arg("group_size"), py::arg("bias"), py::arg("fmt"), py::arg("K"));
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, bool, bool, bool, const at::Tensor&, double, double, bool>(),
           py::arg("hidden"), py::arg("heads"), py::arg("ffn"), py::arg("geglu"), py::arg("gelu_tanh"),
           py::arg("rotary_2d"), py::arg("inv_freq"), py::arg("eps"), py::arg("alpha"), py::arg("pre_ln"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_output", &DecodeStack::set_output)
      .def("step", &DecodeStack::step, py::call_guard<py::gil_scoped_release>(), py::arg("ids"), py::arg("positions"),
           py::arg("allowed"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("T"), py::arg("logits_at"),
           py::arg("threads"));
}
