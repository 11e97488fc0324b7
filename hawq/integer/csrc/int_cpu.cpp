// Fused integer epilogues and nonlinearities for the CPU backend of hawq.integer.ops.
// Every function reproduces the reference semantics of hawq.integer (int64 arithmetic,
// round half to even shifts, floor divisions) element by element, in one pass per tensor.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

using i64 = int64_t;

static inline i64 rshift_round(i64 v, i64 e) {
  // round(v / 2^e), half to even (hawq.integer.dyadic.rshift_round)
  if (e <= 0) return v;
  i64 adj = (((i64)1 << (e - 1)) - 1) + ((v >> e) & 1);
  return (v + adj) >> e;
}
static inline i64 floordiv(i64 a, i64 b) {  // b > 0
  i64 q = a / b;
  return (a % b != 0 && (a < 0)) ? q - 1 : q;
}
static inline i64 clampi(i64 v, i64 lo, i64 hi) { return v < lo ? lo : (v > hi ? hi : v); }

// out[r, n] = lut?[clamp(rshift_round((acc[r, n] + bias[n]) * m[n], e[n]) + z[n], lo[n], hi[n])]
template <typename TI, typename TO>
static void requant_kernel(const TI* acc, const int32_t* bias, const i64* m, const i64* e,
                           const i64* z, const i64* lo, const i64* hi, const int32_t* lut,
                           const int32_t* res, i64 rlim, TO* out, i64 rows, i64 n) {
  at::parallel_for(0, rows, 16, [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
      const TI* a = acc + r * n;
      TO* o = out + r * n;
      const int32_t* rr = res ? res + r * n : nullptr;
      for (i64 j = 0; j < n; ++j) {
        i64 v = (i64)a[j] + (bias ? (i64)bias[j] : 0);
        i64 q = clampi(rshift_round(v * m[j], e[j]) + z[j], lo[j], hi[j]);
        if (lut) q = lut[q - lo[j]];
        if (rr) q = clampi(q + (i64)rr[j], -rlim, rlim);
        o[j] = (TO)q;
      }
    }
  });
}

torch::Tensor requant(torch::Tensor acc, c10::optional<torch::Tensor> bias, torch::Tensor m,
                      torch::Tensor e, torch::Tensor z, torch::Tensor lo, torch::Tensor hi,
                      c10::optional<torch::Tensor> lut, c10::optional<torch::Tensor> res,
                      int64_t rlim, at::ScalarType out_dtype) {
  acc = acc.contiguous();
  const i64 n = acc.size(-1), rows = n ? acc.numel() / n : 0;
  auto out = torch::empty(acc.sizes(), acc.options().dtype(out_dtype));
  const int32_t* bp = bias ? bias->data_ptr<int32_t>() : nullptr;
  const int32_t* lp = lut ? lut->data_ptr<int32_t>() : nullptr;
  torch::Tensor resc;
  if (res) resc = res->contiguous();
  const int32_t* rp = res ? resc.data_ptr<int32_t>() : nullptr;
  auto args = [&](auto* a, auto* o) {
    requant_kernel(a, bp, m.data_ptr<i64>(), e.data_ptr<i64>(), z.data_ptr<i64>(),
                   lo.data_ptr<i64>(), hi.data_ptr<i64>(), lp, rp, rlim, o, rows, n);
  };
  auto dispatch_out = [&](auto* a) {
    if (out_dtype == at::kChar) args(a, out.data_ptr<int8_t>());
    else if (out_dtype == at::kInt) args(a, out.data_ptr<int32_t>());
    else args(a, out.data_ptr<i64>());
  };
  switch (acc.scalar_type()) {
    case at::kFloat: dispatch_out(acc.data_ptr<float>()); break;
    case at::kInt: dispatch_out(acc.data_ptr<int32_t>()); break;
    case at::kLong: dispatch_out(acc.data_ptr<i64>()); break;
    default: TORCH_CHECK(false, "requant: accumulator must be float32 (integer-valued), int32 or int64");
  }
  return out;
}

// IntSoftmax (hawq.integer.softmax) over the last dim, optionally followed by a scalar requant.
template <typename TI, typename TO>
static void softmax_kernel(const TI* x, TO* out, i64 rows, i64 n, i64 shift, i64 q_ln2,
                           const i64* table, i64 kbits, bool rq, i64 m, i64 e, i64 z, i64 lo,
                           i64 hi) {
  at::parallel_for(0, rows, 8, [&](i64 r0, i64 r1) {
    std::vector<i64> buf(n);
    for (i64 r = r0; r < r1; ++r) {
      const TI* a = x + r * n;
      i64 mx = INT64_MIN;
      for (i64 j = 0; j < n; ++j) {
        i64 q = (i64)a[j];
        q = shift > 0 ? q * ((i64)1 << shift) : (shift < 0 ? rshift_round(q, -shift) : q);
        buf[j] = q;
        mx = q > mx ? q : mx;
      }
      i64 total = 0;
      for (i64 j = 0; j < n; ++j) {
        i64 q = buf[j] - mx;
        i64 zz = floordiv(-q, q_ln2);
        zz = zz > 32 ? 32 : zz;
        i64 r = -q - zz * q_ln2;
        r = r > q_ln2 - 1 ? q_ln2 - 1 : r;
        i64 ex = table[r] >> zz;
        buf[j] = ex;
        total += ex;
      }
      TO* o = out + r * n;
      for (i64 j = 0; j < n; ++j) {
        i64 p = floordiv(buf[j] << kbits, total);
        if (rq) p = clampi(rshift_round(p * m, e) + z, lo, hi);
        o[j] = (TO)p;
      }
    }
  });
}

torch::Tensor softmax(torch::Tensor x, int64_t shift, int64_t q_ln2, torch::Tensor table,
                      int64_t kbits, std::vector<int64_t> rq, at::ScalarType out_dtype) {
  x = x.contiguous();
  table = table.contiguous();
  const i64* tp = table.data_ptr<i64>();
  const i64 n = x.size(-1), rows = n ? x.numel() / n : 0;
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  bool has = rq.size() == 5;
  i64 m = has ? rq[0] : 1, e = has ? rq[1] : 0, z = has ? rq[2] : 0, lo = has ? rq[3] : 0,
      hi = has ? rq[4] : 0;
  auto go = [&](auto* a) {
    if (out_dtype == at::kChar)
      softmax_kernel(a, out.data_ptr<int8_t>(), rows, n, shift, q_ln2, tp, kbits, has, m, e, z, lo, hi);
    else
      softmax_kernel(a, out.data_ptr<i64>(), rows, n, shift, q_ln2, tp, kbits, has, m, e, z, lo, hi);
  };
  switch (x.scalar_type()) {
    case at::kFloat: go(x.data_ptr<float>()); break;
    case at::kInt: go(x.data_ptr<int32_t>()); break;
    case at::kLong: go(x.data_ptr<i64>()); break;
    default: TORCH_CHECK(false, "softmax: scores must be float32 (integer-valued), int32 or int64");
  }
  return out;
}

static inline i64 bit_length(i64 v) {
  i64 n = 0;
  while (v > 0) { v >>= 1; ++n; }
  return n;
}
static inline i64 isqrt_newton(i64 v, int iters) {  // hawq.integer.layernorm.isqrt
  if (v == 0) return 0;
  i64 r = (i64)1 << ((bit_length(v) + 1) / 2);
  for (int i = 0; i < iters; ++i) {
    i64 nxt = (r + v / r) >> 1;
    nxt = nxt < 1 ? 1 : nxt;
    r = nxt < r ? nxt : r;
  }
  return r;
}

// IntLayerNorm (hawq.integer.layernorm) over the last dim.
template <typename TI, typename TO>
static void layernorm_kernel(const TI* x, TO* out, i64 rows, i64 d, i64 f, i64 t, i64 k,
                             i64 eps_q, const i64* m, const i64* e, const i64* b, i64 z, i64 lo,
                             i64 hi, int iters) {
  at::parallel_for(0, rows, 8, [&](i64 r0, i64 r1) {
    std::vector<i64> c(d);
    for (i64 r = r0; r < r1; ++r) {
      const TI* a = x + r * d;
      i64 s = 0;
      for (i64 j = 0; j < d; ++j) s += (i64)a[j];
      i64 mu = floordiv((s << (f + 1)) + d, 2 * d);  // round(sum 2^f / D), half up
      i64 ss = 0;
      for (i64 j = 0; j < d; ++j) {
        i64 cj = ((i64)a[j] << f) - mu;
        c[j] = cj;
        ss += cj * cj;
      }
      i64 v = floordiv(ss, d);
      v = (v << (2 * t)) + eps_q;
      i64 rt = isqrt_newton(v, iters);
      rt = rt < 1 ? 1 : rt;
      TO* o = out + r * d;
      for (i64 j = 0; j < d; ++j) {
        i64 y = floordiv((c[j] << (t + k + 1)) + rt, 2 * rt);
        o[j] = (TO)clampi(rshift_round(y * m[j] + b[j], e[j]) + z, lo, hi);
      }
    }
  });
}

torch::Tensor layernorm(torch::Tensor x, int64_t f, int64_t t, int64_t k, int64_t eps_q,
                        torch::Tensor m, torch::Tensor e, torch::Tensor b, int64_t z, int64_t lo,
                        int64_t hi, int64_t iters, at::ScalarType out_dtype) {
  x = x.contiguous();
  const i64 d = x.size(-1), rows = d ? x.numel() / d : 0;
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  auto go = [&](auto* a) {
    auto run = [&](auto* o) {
      layernorm_kernel(a, o, rows, d, f, t, k, eps_q, m.data_ptr<i64>(), e.data_ptr<i64>(),
                       b.data_ptr<i64>(), z, lo, hi, (int)iters);
    };
    if (out_dtype == at::kChar) run(out.data_ptr<int8_t>());
    else run(out.data_ptr<int32_t>());
  };
  switch (x.scalar_type()) {
    case at::kInt: go(x.data_ptr<int32_t>()); break;
    case at::kLong: go(x.data_ptr<i64>()); break;
    case at::kChar: go(x.data_ptr<int8_t>()); break;
    default: TORCH_CHECK(false, "layernorm: input must be int8, int32 or int64");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("requant", &requant);
  mod.def("softmax", &softmax);
  mod.def("layernorm", &layernorm);
}
