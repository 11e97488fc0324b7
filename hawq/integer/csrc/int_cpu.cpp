// Fused integer epilogues and nonlinearities for the CPU backend of hawq.integer.ops.
// Every function reproduces the reference semantics of hawq.integer (int64 arithmetic,
// round half to even shifts, floor divisions) element by element, in one pass per tensor.
//
// Speed: the inner loops are branch-free over one row so that the compiler vectorises them
// (-O3 -march=native: 8 int64 lanes with AVX-512's vpmullq / vpsravq / vpminsq, gathers for
// tables). Divisions by a per-row constant are an exact floor division done as a float64
// estimate plus one integer correction step (floordiv_fast), valid while |quotient| < 2^50;
// rows whose bounds could leave that range take the scalar integer path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

using i64 = int64_t;

static inline i64 rshift_round(i64 v, i64 e) {
  // round(v / 2^e), half to even (hawq.integer.dyadic.rshift_round); e >= 0, branch-free:
  // adj = max(2^(e-1) - 1 + ((v >> e) & 1), 0) is 0 for e = 0.
  i64 half = ((i64)1 << e) >> 1;
  i64 adj = half - 1 + ((v >> e) & 1);
  adj = adj < 0 ? 0 : adj;
  return (v + adj) >> e;
}
static inline i64 floordiv(i64 a, i64 b) {  // b > 0
  i64 q = a / b;
  return (a % b != 0 && (a < 0)) ? q - 1 : q;
}
static inline i64 floordiv_fast(i64 a, i64 b, double inv_b) {
  // floor(a / b) for b > 0 and |a / b| < 2^50: a float64 estimate is within 1 of the
  // quotient; one integer correction makes it exact.
  i64 q = (i64)std::floor((double)a * inv_b);
  i64 r = a - q * b;
  q = r < 0 ? q - 1 : q;
  q = r >= b ? q + 1 : q;
  return q;
}
static inline i64 clampi(i64 v, i64 lo, i64 hi) { return v < lo ? lo : (v > hi ? hi : v); }

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAWQ_AVX512 1
#include <immintrin.h>
// 8 int64 lanes; every helper is the lane-wise twin of the scalar function above it.
using v8 = __m512i;
static inline __mmask8 tail_mask(i64 left) { return left >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << left) - 1); }
static inline v8 load8(const float* p, __mmask8 k) { return _mm512_cvttps_epi64(_mm256_maskz_loadu_ps(k, p)); }
static inline v8 load8(const int32_t* p, __mmask8 k) { return _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, p)); }
static inline v8 load8(const i64* p, __mmask8 k) { return _mm512_maskz_loadu_epi64(k, p); }
static inline v8 load8(const int8_t* p, __mmask8 k) { return _mm512_cvtepi8_epi64(_mm_maskz_loadu_epi8((__mmask16)k, p)); }
static inline void store8(int8_t* p, v8 v, __mmask8 k) { _mm512_mask_cvtepi64_storeu_epi8(p, k, v); }
static inline void store8(int32_t* p, v8 v, __mmask8 k) { _mm512_mask_cvtepi64_storeu_epi32(p, k, v); }
static inline void store8(float* p, v8 v, __mmask8 k) { _mm256_mask_storeu_ps(p, k, _mm512_cvtepi64_ps(v)); }
static inline void store8(i64* p, v8 v, __mmask8 k) { _mm512_mask_storeu_epi64(p, k, v); }
static inline v8 v_rshift_round(v8 v, v8 e) {
  const v8 one = _mm512_set1_epi64(1);
  v8 half = _mm512_srli_epi64(_mm512_sllv_epi64(one, e), 1);
  v8 adj = _mm512_add_epi64(_mm512_sub_epi64(half, one), _mm512_and_si512(_mm512_srav_epi64(v, e), one));
  adj = _mm512_max_epi64(adj, _mm512_setzero_si512());
  return _mm512_srav_epi64(_mm512_add_epi64(v, adj), e);
}
static inline v8 v_floordiv_fast(v8 a, v8 b, __m512d inv_b) {
  __m512d qd = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(a), inv_b),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  v8 q = _mm512_cvttpd_epi64(qd);
  v8 r = _mm512_sub_epi64(a, _mm512_mullo_epi64(q, b));
  const v8 one = _mm512_set1_epi64(1);
  __mmask8 neg = _mm512_cmplt_epi64_mask(r, _mm512_setzero_si512());
  __mmask8 big = _mm512_cmpge_epi64_mask(r, b);
  q = _mm512_mask_sub_epi64(q, neg, q, one);
  return _mm512_mask_add_epi64(q, big, q, one);
}
// floor(a / b) for b > 0 with |a| < 2^53 (and |a / b| < 2^50): all in float64, exact -- the
// remainder a - q b of the estimate q is an integer below 2^53, so one fused multiply-add
// gives it without rounding, and one correction step fixes q.
static inline v8 v_floordiv_f64(v8 a, __m512d b, __m512d inv_b) {
  const __m512d ad = _mm512_cvtepi64_pd(a);
  __m512d q = _mm512_roundscale_pd(_mm512_mul_pd(ad, inv_b), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512d r = _mm512_fnmadd_pd(q, b, ad);
  const __m512d one = _mm512_set1_pd(1.0);
  q = _mm512_mask_sub_pd(q, _mm512_cmp_pd_mask(r, _mm512_setzero_pd(), _CMP_LT_OQ), q, one);
  q = _mm512_mask_add_pd(q, _mm512_cmp_pd_mask(r, b, _CMP_GE_OQ), q, one);
  return _mm512_cvtpd_epi64(q);
}
static inline v8 v_clamp(v8 v, v8 lo, v8 hi) { return _mm512_min_epi64(_mm512_max_epi64(v, lo), hi); }
#endif

// ---------------------------------------------------------------------------- requant
// out[r, n] = lut?[clamp(rshift_round((acc[r, n] + bias[n]) * m[n], e[n]) + z[n], lo[n], hi[n])]
//             then (res) clamp(. + res[r, n], rlo, rhi)
struct RqFields {
  const i64 *m, *e, *z, *lo, *hi;
};
// Optional output layout for a qkv projection: rows (B T), columns (3, H, hd) written to
// (3, B, H, T, hd), the layout the attention products read. Off when H == 0.
struct Split {
  i64 B = 0, T = 0, H = 0, hd = 0;
  std::vector<i64> col;  // column j's part of the flat output index: s B H T hd + h T hd + d
  void init() {
    const i64 n = 3 * H * hd;
    col.resize(n);
    for (i64 j = 0; j < n; ++j) {
      const i64 s = j / (H * hd), h = (j / hd) % H, d = j % hd;
      col[j] = ((s * B * H + h) * T) * hd + d;
    }
  }
  inline i64 row(i64 r) const { return ((r / T) * H * T + r % T) * hd; }  // b H T hd + t hd
};

template <typename TI, typename TO, bool BIAS, bool LUT, bool RES>
static void requant_rows(const TI* acc, const int32_t* bias, RqFields f, const int32_t* lut,
                         const int32_t* res, i64 rlo, i64 rhi, TO* out, i64 rows, i64 n, const Split& sp) {
  const bool split = sp.H > 0;
  constexpr i64 TILE = 8;  // rows per tile: the per-column fields are loaded once per tile
  const i64 tiles = (rows + TILE - 1) / TILE;
  const i64 grain = std::max<i64>(1, 16384 / std::max<i64>(n * TILE, 1));
  at::parallel_for(0, tiles, grain, [&](i64 t0, i64 t1) {
    for (i64 t = t0; t < t1; ++t) {
      const i64 r0 = t * TILE, r1 = std::min(rows, r0 + TILE);
      i64 j = 0;
#ifdef HAWQ_AVX512
      const v8 lim = _mm512_set1_epi64(rhi), nlim = _mm512_set1_epi64(rlo);
      for (; j < n && (!split || sp.hd % 8 == 0); j += 8) {
        const __mmask8 k = tail_mask(n - j);
        const v8 b = BIAS ? load8(bias + j, k) : _mm512_setzero_si512();
        const v8 m = load8(f.m + j, k), e = load8(f.e + j, k), z = load8(f.z + j, k);
        const v8 lo = load8(f.lo + j, k), hi = load8(f.hi + j, k);
        for (i64 r = r0; r < r1; ++r) {
          v8 v = load8(acc + r * n + j, k);
          if (BIAS) v = _mm512_add_epi64(v, b);
          v8 q = _mm512_add_epi64(v_rshift_round(_mm512_mullo_epi64(v, m), e), z);
          q = v_clamp(q, lo, hi);
          if (LUT) q = _mm512_cvtepi32_epi64(_mm512_mask_i64gather_epi32(
                       _mm256_setzero_si256(), k, _mm512_sub_epi64(q, lo), lut, 4));
          if (RES) q = v_clamp(_mm512_add_epi64(q, load8(res + r * n + j, k)), nlim, lim);
          store8(out + (split ? sp.row(r) + sp.col[j] : r * n + j), q, k);
        }
      }
#endif
      for (i64 r = r0; r < r1 && j < n; ++r) {
        const TI* a = acc + r * n;
        const int32_t* rr = RES ? res + r * n : nullptr;
        for (i64 jj = j; jj < n; ++jj) {
          i64 v = (i64)a[jj];
          if (BIAS) v += (i64)bias[jj];
          i64 q = clampi(rshift_round(v * f.m[jj], f.e[jj]) + f.z[jj], f.lo[jj], f.hi[jj]);
          if (LUT) q = lut[q - f.lo[jj]];
          if (RES) q = clampi(q + (i64)rr[jj], rlo, rhi);
          out[split ? sp.row(r) + sp.col[jj] : r * n + jj] = (TO)q;
        }
      }
    }
  });
}

template <typename TI, typename TO>
static void requant_dispatch(const TI* acc, const int32_t* bias, RqFields f, const int32_t* lut,
                             const int32_t* res, i64 rlo, i64 rhi, TO* out, i64 rows, i64 n, const Split& sp) {
  const int key = (bias ? 1 : 0) | (lut ? 2 : 0) | (res ? 4 : 0);
#define HAWQ_RQ(K, B, L, R) \
  case K: requant_rows<TI, TO, B, L, R>(acc, bias, f, lut, res, rlo, rhi, out, rows, n, sp); break;
  switch (key) {
    HAWQ_RQ(0, false, false, false)
    HAWQ_RQ(1, true, false, false)
    HAWQ_RQ(2, false, true, false)
    HAWQ_RQ(3, true, true, false)
    HAWQ_RQ(4, false, false, true)
    HAWQ_RQ(5, true, false, true)
    HAWQ_RQ(6, false, true, true)
    HAWQ_RQ(7, true, true, true)
  }
#undef HAWQ_RQ
}

torch::Tensor requant(torch::Tensor acc, c10::optional<torch::Tensor> bias, torch::Tensor m,
                      torch::Tensor e, torch::Tensor z, torch::Tensor lo, torch::Tensor hi,
                      c10::optional<torch::Tensor> lut, c10::optional<torch::Tensor> res,
                      int64_t rlo, int64_t rhi, at::ScalarType out_dtype, std::vector<int64_t> split) {
  acc = acc.contiguous();
  const i64 n = acc.size(-1), rows = n ? acc.numel() / n : 0;
  Split sp;
  torch::Tensor out;
  if (split.size() == 4) {  // (B, T, H, hd): rows B T, n = 3 H hd
    sp.B = split[0]; sp.T = split[1]; sp.H = split[2]; sp.hd = split[3];
    sp.init();
    TORCH_CHECK(sp.B * sp.T == rows && 3 * sp.H * sp.hd == n, "requant: split does not match");
    out = torch::empty({3, sp.B, sp.H, sp.T, sp.hd}, acc.options().dtype(out_dtype));
  } else {
    out = torch::empty(acc.sizes(), acc.options().dtype(out_dtype));
  }
  const int32_t* bp = bias ? bias->data_ptr<int32_t>() : nullptr;
  const int32_t* lp = lut ? lut->data_ptr<int32_t>() : nullptr;
  torch::Tensor resc;
  if (res) resc = res->contiguous();
  const int32_t* rp = res ? resc.data_ptr<int32_t>() : nullptr;
  RqFields f{m.data_ptr<i64>(), e.data_ptr<i64>(), z.data_ptr<i64>(), lo.data_ptr<i64>(),
             hi.data_ptr<i64>()};
  auto dispatch_out = [&](auto* a) {
    if (out_dtype == at::kChar) requant_dispatch(a, bp, f, lp, rp, rlo, rhi, out.data_ptr<int8_t>(), rows, n, sp);
    else if (out_dtype == at::kInt) requant_dispatch(a, bp, f, lp, rp, rlo, rhi, out.data_ptr<int32_t>(), rows, n, sp);
    else if (out_dtype == at::kFloat) requant_dispatch(a, bp, f, lp, rp, rlo, rhi, out.data_ptr<float>(), rows, n, sp);
    else requant_dispatch(a, bp, f, lp, rp, rlo, rhi, out.data_ptr<i64>(), rows, n, sp);
  };
  switch (acc.scalar_type()) {
    case at::kFloat: dispatch_out(acc.data_ptr<float>()); break;
    case at::kInt: dispatch_out(acc.data_ptr<int32_t>()); break;
    case at::kLong: dispatch_out(acc.data_ptr<i64>()); break;
    default: TORCH_CHECK(false, "requant: accumulator must be float32 (integer-valued), int32 or int64");
  }
  return out;
}

// ---------------------------------------------------------------------------- softmax
// IntSoftmax (hawq.integer.softmax) over the last dim, optionally followed by a scalar requant
// and a zero-point subtraction (out = requant(p) - sub: the operand of the next product).
static constexpr i64 MAX_Z = 32;

// One softmax row: a[0..n) -> o[0..n) (see softmax_kernel); buf holds n int64.
struct SoftmaxParams {
  i64 shift, q_ln2, kbits;
  const int32_t* table;
  bool rq;
  i64 m, e, z, lo, hi, sub;
};

template <typename TI, typename TO>
static inline void softmax_row(const TI* a, TO* o, i64 n, const SoftmaxParams& P, i64* buf) {
  const i64 shift = P.shift, q_ln2 = P.q_ln2, kbits = P.kbits;
  const int32_t* table = P.table;
  const bool rq = P.rq;
  const i64 m = P.m, e = P.e, z = P.z, lo = P.lo, hi = P.hi, sub = P.sub;
  const double inv_ln2 = 1.0 / (double)q_ln2;
  const i64 cap = (MAX_Z + 1) * q_ln2;  // -q above this gives z = MAX_Z and r = q_ln2 - 1 anyway
  i64 mx = INT64_MIN, total = 0, j = 0;
  // 1. to the working scale, row maximum
#ifdef HAWQ_AVX512
  {
    v8 vmx = _mm512_set1_epi64(INT64_MIN);
    const v8 vsh = _mm512_set1_epi64(shift < 0 ? -shift : shift);
    for (; j < n; j += 8) {
      const __mmask8 k = tail_mask(n - j);
      v8 q = load8(a + j, k);
      q = shift >= 0 ? _mm512_sllv_epi64(q, vsh) : v_rshift_round(q, vsh);
      _mm512_mask_storeu_epi64(buf + j, k, q);
      vmx = _mm512_mask_max_epi64(vmx, k, vmx, q);
    }
    mx = _mm512_reduce_max_epi64(vmx);
  }
#endif
  if (j < n && shift >= 0) {
    for (j = 0; j < n; ++j) {
      i64 q = (i64)a[j] * ((i64)1 << shift);
      buf[j] = q;
      mx = q > mx ? q : mx;
    }
  } else if (j < n) {
    for (j = 0; j < n; ++j) {
      i64 q = rshift_round((i64)a[j], -shift);
      buf[j] = q;
      mx = q > mx ? q : mx;
    }
  }
  // 2. exp by range reduction and the table: buf <- T[r] >> z, total = sum
  j = 0;
#ifdef HAWQ_AVX512
  {
    const v8 vmx = _mm512_set1_epi64(mx), vcap = _mm512_set1_epi64(cap);
    const v8 vln2 = _mm512_set1_epi64(q_ln2), vlast = _mm512_set1_epi64(q_ln2 - 1);
    const v8 vmaxz = _mm512_set1_epi64(MAX_Z);
    const __m512d vinv = _mm512_set1_pd(inv_ln2), vln2d = _mm512_set1_pd((double)q_ln2);
    v8 vtot = _mm512_setzero_si512();
    for (; j < n; j += 8) {
      const __mmask8 k = tail_mask(n - j);
      v8 nq = _mm512_min_epi64(_mm512_sub_epi64(vmx, load8(buf + j, k)), vcap);
      v8 zz = _mm512_min_epi64(v_floordiv_f64(nq, vln2d, vinv), vmaxz);
      v8 rem = _mm512_min_epi64(_mm512_sub_epi64(nq, _mm512_mullo_epi64(zz, vln2)), vlast);
      v8 ex = _mm512_srav_epi64(
          _mm512_cvtepi32_epi64(_mm512_mask_i64gather_epi32(_mm256_setzero_si256(), k, rem, table, 4)), zz);
      _mm512_mask_storeu_epi64(buf + j, k, ex);
      vtot = _mm512_mask_add_epi64(vtot, k, vtot, ex);
    }
    total = _mm512_reduce_add_epi64(vtot);
  }
#endif
  for (; j < n; ++j) {
    i64 nq = mx - buf[j];  // -q >= 0
    nq = nq > cap ? cap : nq;
    i64 zz = floordiv_fast(nq, q_ln2, inv_ln2);
    zz = zz > MAX_Z ? MAX_Z : zz;
    i64 rem = nq - zz * q_ln2;
    rem = rem > q_ln2 - 1 ? q_ln2 - 1 : rem;
    i64 ex = (i64)table[rem] >> zz;
    buf[j] = ex;
    total += ex;
  }
  // 3. normalise: floor(ex 2^kbits / total) (total >= T[0] > 0, quotients <= 2^kbits),
  //    then the optional requant and zero-point subtraction
  const double inv_t = 1.0 / (double)total;
  j = 0;
#ifdef HAWQ_AVX512
  {
    const v8 vt = _mm512_set1_epi64(total), vm = _mm512_set1_epi64(m);
    const v8 ve = _mm512_set1_epi64(e), vz = _mm512_set1_epi64(z);
    const v8 vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
    const v8 vsub = _mm512_set1_epi64(sub);
    const __m512d vinv = _mm512_set1_pd(inv_t), vtd = _mm512_set1_pd((double)total);
    const bool small = kbits + 31 <= 53;  // ex < 2^31: ex 2^kbits < 2^53
    for (; j < n; j += 8) {
      const __mmask8 k = tail_mask(n - j);
      v8 num = _mm512_sllv_epi64(load8(buf + j, k), _mm512_set1_epi64(kbits));
      v8 p = small ? v_floordiv_f64(num, vtd, vinv) : v_floordiv_fast(num, vt, vinv);
      if (rq) p = v_clamp(_mm512_add_epi64(v_rshift_round(_mm512_mullo_epi64(p, vm), ve), vz),
                          vlo, vhi);
      store8(o + j, _mm512_sub_epi64(p, vsub), k);
    }
  }
#endif
  for (; j < n; ++j) {
    i64 p = floordiv_fast(buf[j] << kbits, total, inv_t);
    if (rq) p = clampi(rshift_round(p * m, e) + z, lo, hi);
    o[j] = (TO)(p - sub);
  }
}

template <typename TI, typename TO>
static void softmax_kernel(const TI* x, TO* out, i64 rows, i64 n, const SoftmaxParams& P) {
  at::parallel_for(0, rows, std::max<i64>(1, 4096 / std::max<i64>(n, 1)), [&](i64 r0, i64 r1) {
    std::vector<i64> buf(n);
    for (i64 r = r0; r < r1; ++r) softmax_row(x + r * n, out + r * n, n, P, buf.data());
  });
}

torch::Tensor softmax(torch::Tensor x, int64_t shift, int64_t q_ln2, torch::Tensor table,
                      int64_t kbits, std::vector<int64_t> rq, at::ScalarType out_dtype,
                      int64_t sub) {
  x = x.contiguous();
  table = table.contiguous();
  TORCH_CHECK(table.scalar_type() == at::kInt, "softmax: int32 exp table expected");
  const int32_t* tp = table.data_ptr<int32_t>();
  const i64 n = x.size(-1), rows = n ? x.numel() / n : 0;
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  bool has = rq.size() == 5;
  i64 m = has ? rq[0] : 1, e = has ? rq[1] : 0, z = has ? rq[2] : 0, lo = has ? rq[3] : 0,
      hi = has ? rq[4] : 0;
  const SoftmaxParams P{shift, q_ln2, kbits, tp, has, m, e, z, lo, hi, sub};
  auto go = [&](auto* a) {
    auto run = [&](auto* o) { softmax_kernel(a, o, rows, n, P); };
    if (out_dtype == at::kChar) run(out.data_ptr<int8_t>());
    else if (out_dtype == at::kFloat) run(out.data_ptr<float>());
    else run(out.data_ptr<i64>());
  };
  switch (x.scalar_type()) {
    case at::kFloat: go(x.data_ptr<float>()); break;
    case at::kInt: go(x.data_ptr<int32_t>()); break;
    case at::kLong: go(x.data_ptr<i64>()); break;
    default: TORCH_CHECK(false, "softmax: scores must be float32 (integer-valued), int32 or int64");
  }
  return out;
}

// ---------------------------------------------------------------------------- layernorm
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

// IntLayerNorm (hawq.integer.layernorm) over the last dim. Two passes per row: sums (of a
// and a^2, min, max), then the output. sum_j (a_j 2^f - mu)^2 is expanded as
// 2^2f sum a^2 - 2^(f+1) mu sum a + D mu^2 in wrapping uint64 arithmetic: equal to the
// reference's int64 sum whenever that sum fits (as it must for the reference to be defined).
template <typename TI, typename TO>
static void layernorm_kernel(const TI* x, TO* out, i64 rows, i64 d, i64 f, i64 t, i64 k,
                             i64 eps_q, const i64* m, const i64* e, const i64* b, i64 z, i64 lo,
                             i64 hi, int iters) {
  using u64 = uint64_t;
  const i64 up = t + k + 1;
  at::parallel_for(0, rows, std::max<i64>(1, 8192 / std::max<i64>(d, 1)), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
      const TI* a = x + r * d;
      TO* o = out + r * d;
      i64 s = 0, amin = INT64_MAX, amax = INT64_MIN, j = 0;
      u64 sq = 0;
#ifdef HAWQ_AVX512
      {
        v8 vs = _mm512_setzero_si512(), vq = _mm512_setzero_si512();
        v8 vmin = _mm512_set1_epi64(INT64_MAX), vmax = _mm512_set1_epi64(INT64_MIN);
        for (; j + 8 <= d; j += 8) {
          v8 v = load8(a + j, 0xFF);
          vs = _mm512_add_epi64(vs, v);
          vq = _mm512_add_epi64(vq, _mm512_mullo_epi64(v, v));
          vmin = _mm512_min_epi64(vmin, v);
          vmax = _mm512_max_epi64(vmax, v);
        }
        s = _mm512_reduce_add_epi64(vs);
        sq = (u64)_mm512_reduce_add_epi64(vq);
        amin = _mm512_reduce_min_epi64(vmin);
        amax = _mm512_reduce_max_epi64(vmax);
      }
#endif
      for (; j < d; ++j) {
        const i64 v = (i64)a[j];
        s += v;
        sq += (u64)v * (u64)v;
        amin = v < amin ? v : amin;
        amax = v > amax ? v : amax;
      }
      const i64 mu = floordiv((s << (f + 1)) + d, 2 * d);  // round(sum 2^f / D), half up
      const u64 ssu = (sq << (2 * f)) - (((u64)mu * (u64)s) << (f + 1)) + (u64)d * (u64)mu * (u64)mu;
      const i64 ss = (i64)ssu;
      const i64 c1 = (amax << f) - mu, c0 = mu - (amin << f);
      const i64 cmax = c1 > c0 ? c1 : c0;
      i64 v = floordiv(ss, d);
      v = (v << (2 * t)) + eps_q;
      i64 rt = isqrt_newton(v, iters);
      rt = rt < 1 ? 1 : rt;
      const i64 den = 2 * rt;
      // |quotient| <= (cmax 2^up + rt) / (2 rt): the fast division needs it below 2^50
      const bool fast = up < 62 && bit_length(cmax) + up - bit_length(rt) < 48;
      const double inv = 1.0 / (double)den;
      j = 0;
#ifdef HAWQ_AVX512
      if (fast) {
        const v8 vden = _mm512_set1_epi64(den), vrt = _mm512_set1_epi64(rt);
        const v8 vf = _mm512_set1_epi64(f), vmu = _mm512_set1_epi64(mu);
        const v8 vup = _mm512_set1_epi64(up), vz = _mm512_set1_epi64(z);
        const v8 vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
        const __m512d vinv = _mm512_set1_pd(inv), vdend = _mm512_set1_pd((double)den);
        // |num| <= cmax 2^up + rt < 2^53: the float64 division
        const bool exact53 = bit_length(cmax) + up + 1 < 53;
        for (; j < d; j += 8) {
          const __mmask8 km = tail_mask(d - j);
          v8 c = _mm512_sub_epi64(_mm512_sllv_epi64(load8(a + j, km), vf), vmu);
          const v8 num = _mm512_add_epi64(_mm512_sllv_epi64(c, vup), vrt);
          v8 y = exact53 ? v_floordiv_f64(num, vdend, vinv) : v_floordiv_fast(num, vden, vinv);
          y = _mm512_add_epi64(_mm512_mullo_epi64(y, load8(m + j, km)), load8(b + j, km));
          y = _mm512_add_epi64(v_rshift_round(y, load8(e + j, km)), vz);
          store8(o + j, v_clamp(y, vlo, vhi), km);
        }
      }
#endif
      for (; j < d; ++j) {
        const i64 c = ((i64)a[j] << f) - mu;
        const i64 num = (c << up) + rt;
        const i64 y = fast ? floordiv_fast(num, den, inv) : floordiv(num, den);
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

// ---------------------------------------------------------------------------- conv input
// int8 (B, H, W, C) -> uint8 (B, H + 2p, W + 2p, C) codes + 128 (a bit flip), the border
// filled with value + 128: the padded channels-last input of oneDNN's u8 convolution.
torch::Tensor pad_u8(torch::Tensor x, int64_t p, int64_t value) {
  x = x.contiguous();
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar, "pad_u8: int8 (B, H, W, C) expected");
  const i64 B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const i64 Hp = H + 2 * p, Wp = W + 2 * p;
  auto out = torch::empty({B, Hp, Wp, C}, x.options().dtype(at::kByte));
  const uint8_t* src = (const uint8_t*)x.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t fill = (uint8_t)((value + 128) & 0xFF);
  at::parallel_for(0, B * Hp, std::max<i64>(1, 65536 / std::max<i64>(Wp * C, 1)), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
      const i64 b = r / Hp, y = r % Hp - p;
      uint8_t* o = dst + r * Wp * C;
      if (y < 0 || y >= H) {
        std::memset(o, fill, Wp * C);
        continue;
      }
      std::memset(o, fill, p * C);
      const uint8_t* a = src + (b * H + y) * W * C;
      uint8_t* oo = o + p * C;
      i64 j = 0;
#ifdef HAWQ_AVX512
      const __m512i flip = _mm512_set1_epi8((char)0x80);
      for (; j + 64 <= W * C; j += 64)
        _mm512_storeu_si512(oo + j, _mm512_xor_si512(_mm512_loadu_si512(a + j), flip));
#endif
      for (; j < W * C; ++j) oo[j] = a[j] ^ 0x80;
      std::memset(o + (p + W) * C, fill, p * C);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------- attention
// Fused integer attention (hawq.integer.ops.int_attention after the qkv projection), one
// (batch, head) pair at a time in L1/L2, on AVX-512 VNNI (vpdpbusd: u8 x s8 -> i32):
//   S = (q - zq)(k - zk)^T = (q + 128) k^T - (128 + zq) colsum(k) - zk rowsum(q) + hd zq zk
//   P = p_rq(softmax(S)) (int8 codes, zero point zp), as u8 P + 128
//   O = (P - zp)(v - zv) = (P + 128) v - (128 + zp) colsum(v) - zv rowsum(P) + T zp zv
//   out[b, t, h hd + d] = o_rq(O) (int8)
// Every term is an exact integer (|S|, |O| < 2^31 for hd, T <= 2^15); operands are padded
// with zeros (u8 0 times s8 0) to whole 4-byte groups and 16-lane blocks.
#if defined(HAWQ_AVX512) && defined(__AVX512VNNI__)
#define HAWQ_VNNI 1
static inline i64 round_up(i64 v, i64 m) { return (v + m - 1) / m * m; }
static inline __mmask64 bytes_mask(i64 left) {  // the first min(left, 64) bytes
  return left >= 64 ? ~(__mmask64)0 : (left <= 0 ? (__mmask64)0 : (((__mmask64)1 << left) - 1));
}

torch::Tensor attention_int8(torch::Tensor qkv, int64_t zq, int64_t zk, int64_t zv, int64_t zp,
                             int64_t shift, int64_t q_ln2, torch::Tensor table, int64_t kbits,
                             std::vector<int64_t> prq, std::vector<int64_t> orq) {
  qkv = qkv.contiguous();
  table = table.contiguous();
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.scalar_type() == at::kChar,
              "attention_int8: int8 (B, T, 3, H, hd) expected");
  TORCH_CHECK(table.scalar_type() == at::kInt && prq.size() == 5 && orq.size() == 5,
              "attention_int8: int32 table and two scalar requants expected");
  const i64 B = qkv.size(0), T = qkv.size(1), H = qkv.size(3), hd = qkv.size(4);
  auto out = torch::empty({B, T, H * hd}, qkv.options());
  const int8_t* src = qkv.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  const SoftmaxParams P{shift, q_ln2, kbits, table.data_ptr<int32_t>(), true,
                        prq[0], prq[1], prq[2], prq[3], prq[4], 0};
  const i64 hd4 = round_up(hd, 4), hd16 = round_up(hd, 16), T4 = round_up(T, 4),
            T16 = round_up(T, 16);
  const int32_t s_bias = (int32_t)(hd * zq * zk), o_bias = (int32_t)(T * zp * zv);
  at::parallel_for(0, B * H, 1, [&](i64 p0, i64 p1) {
    std::vector<uint8_t> qu(T * hd4), pu(T4);
    std::vector<int8_t> kp(hd4 * T16), vp(T4 * hd16);
    std::vector<int32_t> S(T16), rq(T), ck(T16), cv(hd16), prow(T);
    std::vector<i64> buf(T);
    const __m512i v128zq = _mm512_set1_epi32((int32_t)(128 + zq));
    const __m512i v128zp = _mm512_set1_epi32((int32_t)(128 + zp));
    const v8 om = _mm512_set1_epi64(orq[0]), oe = _mm512_set1_epi64(orq[1]);
    const v8 oz = _mm512_set1_epi64(orq[2]), olo = _mm512_set1_epi64(orq[3]);
    const v8 ohi = _mm512_set1_epi64(orq[4]);
    for (i64 pr = p0; pr < p1; ++pr) {
      const i64 b = pr / H, h = pr % H;
      auto row = [&](i64 t, i64 s) { return src + (((b * T + t) * 3 + s) * H + h) * hd; };
      // operands: q + 128 as u8 rows; k as kp[d/4][j][4] (int32 gathers: a 4-byte transpose);
      // v as vp[j/4][d][4] (4 rows interleaved bytewise); sums of k and v rows by VNNI with
      // an all-ones u8 operand
      const i64 tok = 3 * H * hd;  // bytes between consecutive tokens
      const __m512i flip = _mm512_set1_epi8((char)0x80);
      for (i64 t = 0; t < T; ++t) {  // qu = q + 128 (zero past hd), rq = sum q
        const int8_t* q = row(t, 0);
        __m512i sad = _mm512_setzero_si512();
        for (i64 d0 = 0; d0 < hd4; d0 += 64) {
          const __mmask64 valid = bytes_mask(hd - d0), room = bytes_mask(hd4 - d0);
          const __m512i u = _mm512_maskz_mov_epi8(
              valid, _mm512_xor_si512(_mm512_maskz_loadu_epi8(valid, q + d0), flip));
          _mm512_mask_storeu_epi8(&qu[t * hd4 + d0], room, u);
          sad = _mm512_add_epi64(sad, _mm512_sad_epu8(u, _mm512_setzero_si512()));
        }
        rq[t] = (int32_t)(_mm512_reduce_add_epi64(sad) - 128 * hd);
      }
      const __m512i ones = _mm512_set1_epi8(1);
      const __m512i lane = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32((int32_t)tok));
      const int8_t* k0 = row(0, 1);
      for (i64 j0 = 0; j0 < T16; j0 += 16) {
        const __mmask16 km = (T - j0) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T - j0)) - 1);
        __m512i sum = _mm512_setzero_si512();
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)(j0 * tok)));
        for (i64 d4 = 0; d4 < hd4; d4 += 4) {
          __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, idx, k0 + d4, 1);
          if (d4 + 4 > hd) {  // the last group of an hd not divisible by 4: zero the excess bytes
            const int keep = (int)(hd - d4);
            g = _mm512_and_si512(g, _mm512_set1_epi32((int32_t)((1u << (8 * keep)) - 1)));
          }
          _mm512_storeu_si512(&kp[((d4 >> 2) * T16 + j0) * 4], g);
          sum = _mm512_dpbusd_epi32(sum, ones, g);
        }
        _mm512_storeu_si512(&ck[j0], sum);
      }
      const __m128i zero16 = _mm_setzero_si128();
      for (i64 d0 = 0; d0 < hd16; d0 += 16) {
        const __mmask16 dm = (hd - d0) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (hd - d0)) - 1);
        __m512i sum = _mm512_setzero_si512();
        for (i64 j4 = 0; j4 < T4; j4 += 4) {
          __m128i r[4];
          for (int u = 0; u < 4; ++u)
            r[u] = (j4 + u < T) ? _mm_maskz_loadu_epi8(dm, row(j4 + u, 2) + d0) : zero16;
          const __m128i a01l = _mm_unpacklo_epi8(r[0], r[1]), a01h = _mm_unpackhi_epi8(r[0], r[1]);
          const __m128i a23l = _mm_unpacklo_epi8(r[2], r[3]), a23h = _mm_unpackhi_epi8(r[2], r[3]);
          __m512i g = _mm512_castsi128_si512(_mm_unpacklo_epi16(a01l, a23l));
          g = _mm512_inserti32x4(g, _mm_unpackhi_epi16(a01l, a23l), 1);
          g = _mm512_inserti32x4(g, _mm_unpacklo_epi16(a01h, a23h), 2);
          g = _mm512_inserti32x4(g, _mm_unpackhi_epi16(a01h, a23h), 3);
          _mm512_storeu_si512(&vp[((j4 >> 2) * hd16 + d0) * 4], g);
          sum = _mm512_dpbusd_epi32(sum, ones, g);
        }
        _mm512_storeu_si512(&cv[d0], sum);
      }
      for (i64 i = 0; i < T; ++i) {
        // scores row i
        const __m512i zrow = _mm512_set1_epi32((int32_t)(s_bias - zk * rq[i]));
        for (i64 j0 = 0; j0 < T16; j0 += 16) {
          __m512i acc = _mm512_setzero_si512();
          for (i64 d4 = 0; d4 < hd4; d4 += 4) {
            int32_t a4;
            std::memcpy(&a4, &qu[i * hd4 + d4], 4);
            acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(a4),
                                      _mm512_loadu_si512(&kp[((d4 >> 2) * T16 + j0) * 4]));
          }
          acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(v128zq, _mm512_loadu_si512(&ck[j0])));
          _mm512_storeu_si512(&S[j0], _mm512_add_epi32(acc, zrow));
        }
        // P row: softmax + requant to int8 codes, then + 128 as u8
        softmax_row(S.data(), prow.data(), T, P, buf.data());
        __m512i vsp = _mm512_setzero_si512();
        for (i64 j = 0; j < T; j += 16) {  // pu = P + 128 as u8, sp = sum P
          const __mmask16 km = (T - j) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T - j)) - 1);
          const __m512i pv = _mm512_maskz_loadu_epi32(km, &prow[j]);
          vsp = _mm512_add_epi32(vsp, pv);
          _mm512_mask_cvtepi32_storeu_epi8(&pu[j], km, _mm512_add_epi32(pv, _mm512_set1_epi32(128)));
        }
        const int32_t sp = _mm512_reduce_add_epi32(vsp);
        // output row i: O = P v, corrected, requantized, stored at (b, i, h hd + d)
        const __m512i zo = _mm512_set1_epi32((int32_t)(o_bias - zv * sp));
        int8_t* o = dst + (b * T + i) * H * hd + h * hd;
        for (i64 d0 = 0; d0 < hd16; d0 += 16) {
          __m512i acc = _mm512_setzero_si512();
          for (i64 j4 = 0; j4 < T4; j4 += 4) {
            int32_t a4;
            std::memcpy(&a4, &pu[j4], 4);
            acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(a4),
                                      _mm512_loadu_si512(&vp[((j4 >> 2) * hd16 + d0) * 4]));
          }
          acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(v128zp, _mm512_loadu_si512(&cv[d0])));
          acc = _mm512_add_epi32(acc, zo);
          for (int half = 0; half < 2; ++half) {
            const i64 dd = d0 + 8 * half;
            if (dd >= hd) break;
            const __mmask8 km = tail_mask(hd - dd);
            v8 x = _mm512_cvtepi32_epi64(half ? _mm512_extracti64x4_epi64(acc, 1)
                                              : _mm512_castsi512_si256(acc));
            x = _mm512_add_epi64(v_rshift_round(_mm512_mullo_epi64(x, om), oe), oz);
            store8(o + dd, v_clamp(x, olo, ohi), km);
          }
        }
      }
    }
  });
  return out;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("requant", &requant);
  mod.def("softmax", &softmax);
  mod.def("layernorm", &layernorm);
  mod.def("pad_u8", &pad_u8);
#ifdef HAWQ_VNNI
  mod.def("attention_int8", &attention_int8);
#endif
}
