// The fused weight-only GEMV / small-batch GEMM of gemv.h as PyTorch functions:
// y[M, N] = x[M, K] @ W[N, K]^T + bias, with W in FP32, BF16, INT8 or packed INT4 (+ FP32
// scales per row or group); and the dequantization of row blocks for long prefills (BLAS).
// The Python module also carries the fused decode step of decode_step.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "gemv.h"

void register_decode_step(pybind11::module& m);  // decode_step.cpp

namespace {
using namespace glm;

// y[M, N] = x[M, K] @ W^T (+ bias). fmt: 0 FP32, 1 BF16, 2 INT8, 3 INT4. K = logical inputs.
// threads: OpenMP threads over rows (1 runs inline, with no fork/join).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                  int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t threads) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous FP32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor sc = scales.has_value() ? scales->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  Problem p = weight_problem(w, sc, group_size, b, fmt, K);
  at::Tensor y = at::empty({M, N}, x.options());
  p.y = y.data_ptr<float>();
  Scratch scratch;
  gemv(p, x.data_ptr<float>(), M, K, static_cast<int>(fmt), threads, scratch);
  return y;
}

// Rows [r0, r1) of an INT8 / INT4 matrix as FP32 [r1 - r0, K] (for long prefills, which then
// use BLAS): the same values as the reference q * scale, written at memory speed.
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, int64_t group_size, int64_t fmt, int64_t K,
                      int64_t r0, int64_t r1, int64_t threads) {
  TORCH_CHECK(fmt == I8 || fmt == I4, "dequantize takes INT8 or INT4 weights");
  TORCH_CHECK(w.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kFloat, "bad inputs");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.size(0), "bad row range");
  const int64_t Ku = w.size(1), ng = scales.size(1);
  const int64_t G = ng > 1 ? group_size : K;
  TORCH_CHECK(G > 0, "bad group size");
  at::Tensor out = at::empty({r1 - r0, K}, scales.options());
  const float* sc = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  auto rows = [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      float* dst = o + (r - r0) * K;
      const float* srow = sc + r * ng;
      if (fmt == I8) {
        const int8_t* q = w.data_ptr<int8_t>() + r * Ku;
        for (int64_t g0 = 0; g0 < K; g0 += G) {
          const float s = srow[g0 / G];
          const int64_t g1 = std::min(K, g0 + G);
          for (int64_t k = g0; k < g1; ++k) dst[k] = static_cast<float>(q[k]) * s;
        }
      } else {
        const uint8_t* q = w.data_ptr<uint8_t>() + r * Ku;
        auto nib = [&](int64_t k) { return static_cast<float>(((k & 1) ? (q[k >> 1] >> 4) : (q[k >> 1] & 15)) - 8); };
        for (int64_t g0 = 0; g0 < K; g0 += G) {  // per group, whole bytes in the middle (vectorized)
          const float s = srow[g0 / G];
          const int64_t g1 = std::min(K, g0 + G);
          int64_t k = g0;
          if (k & 1) dst[k] = nib(k) * s, ++k;
          for (; k + 1 < g1; k += 2) {
            const uint8_t b = q[k >> 1];
            dst[k] = static_cast<float>((b & 15) - 8) * s;
            dst[k + 1] = static_cast<float>((b >> 4) - 8) * s;
          }
          if (k < g1) dst[k] = nib(k) * s;
        }
      }
    }
  };
  const int64_t n = r1 - r0;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, (n * K) >> 20));
  if (nt == 1) {
    rows(r0, r1);
  } else {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t t = omp_get_thread_num(), m = omp_get_num_threads();
      rows(r0 + n * t / m, r0 + n * (t + 1) / m);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "fused dequantizing GEMV/GEMM: y = x @ W^T + bias",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scales"), pybind11::arg("group_size"),
        pybind11::arg("bias"), pybind11::arg("fmt"), pybind11::arg("threads"));
  m.def("dequantize", &dequantize, "rows of an INT8/INT4 matrix as FP32", pybind11::arg("w"),
        pybind11::arg("scales"), pybind11::arg("group_size"), pybind11::arg("fmt"), pybind11::arg("K"),
        pybind11::arg("r0"), pybind11::arg("r1"), pybind11::arg("threads"));
  m.def("set_int_activations", [](bool on) { int_act_enabled().store(on); },
        "use (default) or skip the integer-activation kernels (INT4 x int16 VNNI, INT8/INT4 x int8)");
  m.def("int_activations_enabled", []() { return int_act_enabled().load(); });
  m.def("set_int_activation_rows", [](int64_t rows) { q8_max_rows().store(rows); },
        "largest batch (rows of x) the 8-bit-activation kernel takes");
  m.def("int_activation_rows", []() { return q8_max_rows().load(); });
  m.def("set_int8_activation_min_rows", [](int64_t rows) { q8_min_rows().store(rows); },
        "AVX-512 VNNI builds: rows of x from which INT8/INT4 products take the 8-bit-activation kernel");
  m.def("int8_activation_min_rows", []() { return q8_min_rows().load(); });
#if GLM_Q8_TILE
  m.def("set_int8_tile_min_rows", [](int64_t rows) { q8_tile_min_rows().store(rows); },
        "rows of x from which the 8-bit-activation kernel runs on 8-row weight tiles");
  m.def("int8_tile_min_rows", []() { return q8_tile_min_rows().load(); });
#endif
  m.attr("q8_tile") = bool(GLM_Q8_TILE);
  m.attr("int4_vnni") = bool(GLM_I4_VNNI);
  m.attr("q8") = bool(GLM_Q8);
  m.attr("q8_dot") = Q8_DOT;
  register_decode_step(m);
  m.attr("isa") = ISA;
  m.attr("lanes") = LANES;
  m.attr("max_batch_tile") = MAXM;
}
