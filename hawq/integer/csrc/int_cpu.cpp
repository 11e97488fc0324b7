// Fused integer epilogues and nonlinearities for the CPU backend of hawq.integer.ops.
// Every function reproduces the reference semantics of hawq.integer (int64 arithmetic,
// round half to even shifts, floor divisions) element by element, in one pass per tensor.
//
// Speed: explicit AVX-512 loops (-O3 -march=native). The generic paths work in 8 int64 lanes
// (vpmullq / vpsravq / vpminsq, gathers for tables); the fast paths of issue 28 (requant16,
// ln_row16, softmax_rows32 and the blocked attention kernel) work in 16 int32 lanes, with
// int64 lanes only for 32 x 32 -> 64 products (vpmuldq) and float64 lanes where every value
// is an integer (or an integer times a power of two) below 2^53, hence exact. Each fast path
// states the bounds it needs; they are checked once per call (or per row), and a call or
// row outside them takes the generic path. Divisions by a per-row constant are an exact
// floor division: a float64 estimate plus one correction with the exact remainder
// (floordiv_fast, v_floor_fix). On Zen 4, every 512-bit shift, multiply, conversion and
// shuffle costs one cycle (vpmullq as vpmuldq), simple integer ops half of one, and a gather
// ~1 cycle per lane whatever its mask: the fast paths count instructions accordingly.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>
#include <type_traits>

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
// floor(num / den) from an estimate q within one of it (den > 0; num, den, q exact doubles:
// integers, or integers times one common power of two; den < 2^52): the remainder
// num - q den, below 2 den < 2^53 in magnitude (times that power of two), is computed exactly
// by one FMA and moves q by one when outside [0, den). Off by one only for a quotient within
// ~2^-20 of an integer: the branch is almost never taken (tests/integer/test_cpu_kernels.py
// forces it through check_floor_fix).
static inline __m512d v_floor_fix(__m512d num, __m512d den, __m512d q) {
  const __m512d r = _mm512_fnmadd_pd(q, den, num);
  const __mmask8 low = _mm512_cmp_pd_mask(r, _mm512_setzero_pd(), _CMP_LT_OQ);
  const __mmask8 high = _mm512_cmp_pd_mask(r, den, _CMP_GE_OQ);
  if (__builtin_expect((low | high) != 0, 0)) {
    q = _mm512_mask_sub_pd(q, low, q, _mm512_set1_pd(1.0));
    q = _mm512_mask_add_pd(q, high, q, _mm512_set1_pd(1.0));
  }
  return q;
}
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

#ifdef HAWQ_AVX512
// requant16: the fast path of requant for int32 / float32 accumulators and int8 / int32
// outputs, 16 columns per step (int32 lanes; int64 lanes for the product and its shift).
// A call takes it when every column j satisfies, with A = 2^31 + |b_j| (|acc| <= 2^31):
//   |m_j| < 2^31,  0 <= e_j <= 62,  A |m_j| + 2^61 < 2^63,
//   (A |m_j| >> e_j) + 1 + |z_j| < 2^31,  lo_j, hi_j, rlo, rhi in int32
// (requant16_fits; the integer ViT and ResNet-20 satisfy it with room: e >= 32). Then:
//  * (acc + b) m = acc m + b m: acc m is vpmuldq, the exact 32 x 32 -> 64 signed product of
//    the low halves of 64-bit lanes (even columns, then the odd ones shifted down), b m is
//    precomputed; |(acc + b) m| <= A |m| < 2^63, the reference's int64 value.
//  * rshift_round(v, e), half to even, as round-half-up plus a tie fix: with
//    t = (v + 2^(e-1)) >> e (floor: arithmetic shift; 2^(e-1) folded into the precomputed
//    b m + 2^(e-1), no overflow by the bound above), v / 2^e is a tie exactly when the low e
//    bits of v + 2^(e-1) are zero, and then half to even is t with bit 0 cleared (t odd:
//    t - 1, t even: t). At e = 0 the tie mask is all ones: a "tie" only at v = 0, t = 0.
//  * the rounded value is below 2^31 - 1 - |z| in magnitude (bound above), so it and + z
//    are exact in int32; clamp, table, residual add follow in int32 lanes. The residual
//    add can overflow int32 (both operands are int32): such a vector (and a float
//    accumulator above 2^31, which vcvttps2dq turns into INT32_MIN) is redone by rq_one,
//    requant_rows' formula in scalar int64.
struct RqCols16 {  // per-column fields, padded with zeros to whole 16-column blocks
  // int64, even / odd order within each block (position 16 b + i holds column 16 b + 2 i,
  // position 16 b + 8 + i column 16 b + 2 i + 1): the lanes of vpmuldq's products
  std::vector<i64> m, bmh, e, tie;  // bmh = b m + 2^(e-1), tie = 2^e - 1 (all ones at e = 0)
  std::vector<int32_t> z, lo, hi;   // int32, column order
};
static bool requant16_fits(const RqFields& f, const int32_t* bias, i64 n, i64 rlo, i64 rhi) {
  auto fits32 = [](i64 v) { return v >= INT32_MIN && v <= INT32_MAX; };
  if (!fits32(rlo) || !fits32(rhi)) return false;
  for (i64 j = 0; j < n; ++j) {
    const i64 m = f.m[j], e = f.e[j], z = f.z[j];
    if (!(fits32(m) && e >= 0 && e <= 62 && fits32(z) && fits32(f.lo[j]) && fits32(f.hi[j])))
      return false;
    const __int128 v = ((__int128)1 << 31) + (bias ? std::abs((i64)bias[j]) : 0);
    const __int128 top = v * (m < 0 ? -(__int128)m : (__int128)m);  // >= |(acc + b) m|
    if (top + ((__int128)1 << 61) >= ((__int128)1 << 63)) return false;
    if ((top >> e) + 1 + (z < 0 ? -(__int128)z : (__int128)z) >= ((__int128)1 << 31)) return false;
  }
  return true;
}
static RqCols16 requant16_cols(const RqFields& f, const int32_t* bias, i64 n) {
  RqCols16 c;
  const i64 np = (n + 15) / 16 * 16;
  for (auto* v : {&c.m, &c.bmh, &c.e, &c.tie}) v->assign(np, 0);
  for (auto* v : {&c.z, &c.lo, &c.hi}) v->assign(np, 0);
  for (i64 j = 0; j < n; ++j) {
    const i64 p = (j & ~(i64)15) + ((j & 1) ? 8 : 0) + ((j & 15) >> 1);  // even / odd order
    const i64 e = f.e[j];
    c.m[p] = f.m[j];
    c.bmh[p] = (bias ? (i64)bias[j] * f.m[j] : 0) + (e > 0 ? (i64)1 << (e - 1) : 0);
    c.e[p] = e;
    c.tie[p] = e > 0 ? ((i64)1 << e) - 1 : -1;
    c.z[j] = (int32_t)f.z[j];
    c.lo[j] = (int32_t)f.lo[j];
    c.hi[j] = (int32_t)f.hi[j];
  }
  return c;
}
template <typename TI> static inline __m512i load16(const TI* p, __mmask16 k);
template <> inline __m512i load16(const int32_t* p, __mmask16 k) { return _mm512_maskz_loadu_epi32(k, p); }
template <> inline __m512i load16(const float* p, __mmask16 k) {  // integer-valued floats
  return _mm512_cvttps_epi32(_mm512_maskz_loadu_ps(k, p));        // (INT32_MIN beyond 2^31)
}
static inline void store16(int8_t* p, __m512i v, __mmask16 k) {  // the masked narrowing store
  if (k == 0xFFFF) _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(v));  // is slow on Zen 4:
  else _mm512_mask_cvtepi32_storeu_epi8(p, k, v);                            // tails only
}
static inline void store16(int32_t* p, __m512i v, __mmask16 k) { _mm512_mask_storeu_epi32(p, k, v); }
// rshift_round(v, e) for v = (acc + b) m + 2^(e-1): round half up, then the tie fix
static inline v8 v_round_tie(v8 vh, v8 e, v8 tie) {
  const v8 t = _mm512_srav_epi64(vh, e);
  return _mm512_mask_and_epi64(t, _mm512_testn_epi64_mask(vh, tie), t, _mm512_set1_epi64(~(i64)1));
}
// One element by the reference formula (the rare vectors the int32 path cannot take).
static inline i64 rq_one(i64 v, i64 j, const int32_t* bias, const RqFields& f, const int32_t* lut,
                         const int32_t* res, i64 rlo, i64 rhi) {
  if (bias) v += (i64)bias[j];
  i64 q = clampi(rshift_round(v * f.m[j], f.e[j]) + f.z[j], f.lo[j], f.hi[j]);
  if (lut) q = lut[q - f.lo[j]];
  if (res) q = clampi(q + (i64)*res, rlo, rhi);
  return q;
}
template <typename TI, typename TO, bool LUT, bool RES>
static void requant16(const TI* acc, const RqCols16& c, const int32_t* bias, const RqFields& f,
                      const int32_t* lut, const int32_t* res, i64 rlo, i64 rhi, TO* out, i64 rows,
                      i64 n) {
  constexpr i64 TILE = 8;  // rows per tile: a 16-column block's fields stay in registers
  const i64 tiles = (rows + TILE - 1) / TILE;
  at::parallel_for(0, tiles, std::max<i64>(1, 4096 / std::max<i64>(n, 1)), [&](i64 t0, i64 t1) {
    const __m512i lim = _mm512_set1_epi32((int32_t)rhi), nlim = _mm512_set1_epi32((int32_t)rlo);
    for (i64 t = t0; t < t1; ++t) {
      const i64 r0 = t * TILE, r1 = std::min(rows, r0 + TILE);
      for (i64 j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const v8 me = _mm512_loadu_si512(&c.m[j]), mo = _mm512_loadu_si512(&c.m[j + 8]);
        const v8 be = _mm512_loadu_si512(&c.bmh[j]), bo = _mm512_loadu_si512(&c.bmh[j + 8]);
        const v8 ee = _mm512_loadu_si512(&c.e[j]), eo = _mm512_loadu_si512(&c.e[j + 8]);
        const v8 te = _mm512_loadu_si512(&c.tie[j]), to = _mm512_loadu_si512(&c.tie[j + 8]);
        const __m512i z = _mm512_loadu_si512(&c.z[j]), lo = _mm512_loadu_si512(&c.lo[j]);
        const __m512i hi = _mm512_loadu_si512(&c.hi[j]);
        for (i64 r = r0; r < r1; ++r) {
          const TI* a = acc + r * n;
          TO* o = out + r * n;
          // prefetch this block of the next tile's row: the hardware prefetchers do not follow
          // 8 (16 with a residual) row streams at once (the ViT's requants: -25% time)
          if (r + TILE < rows) {
            _mm_prefetch((const char*)(a + TILE * n + j), _MM_HINT_T0);
            if (RES) _mm_prefetch((const char*)(res + (r + TILE) * n + j), _MM_HINT_T0);
          }
          const __m512i x = load16(a + j, k);
          bool slow = false;
          if (std::is_same<TI, float>::value)
            slow = _mm512_mask_cmpeq_epi32_mask(k, x, _mm512_set1_epi32(INT32_MIN)) != 0;
          const v8 ve = _mm512_add_epi64(_mm512_mul_epi32(x, me), be);
          const v8 vo = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(x, 32), mo), bo);
          // the rounded halves fit int32: interleave them back to column order, then + z
          __m512i q = _mm512_mask_blend_epi32(0xAAAA, v_round_tie(ve, ee, te),
                                              _mm512_slli_epi64(v_round_tie(vo, eo, to), 32));
          q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, z), lo), hi);
          if (LUT) q = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, _mm512_sub_epi32(q, lo), lut, 4);
          if (RES) {
            const __m512i rv = _mm512_maskz_loadu_epi32(k, res + r * n + j);
            const __m512i sum = _mm512_add_epi32(q, rv);
            // signed overflow: the sum's sign differs from both operands' -- (s ^ q) & (s ^ rv) < 0
            slow |= (_mm512_movepi32_mask(_mm512_ternarylogic_epi32(sum, q, rv, 0x18)) & k) != 0;
            q = _mm512_min_epi32(_mm512_max_epi32(sum, nlim), lim);
          }
          if (__builtin_expect(slow, 0)) {
            for (i64 jj = j; jj < std::min(n, j + 16); ++jj)
              o[jj] = (TO)rq_one((i64)a[jj], jj, bias, f, lut, RES ? res + r * n + jj : nullptr, rlo, rhi);
            continue;
          }
          store16(o + j, q, k);
        }
      }
    }
  });
}
template <typename TI, typename TO>
static void requant16_dispatch(const TI* acc, const RqCols16& c, const int32_t* bias, const RqFields& f,
                               const int32_t* lut, const int32_t* res, i64 rlo, i64 rhi, TO* out,
                               i64 rows, i64 n) {
#define HAWQ_RQ(L, R) requant16<TI, TO, L, R>(acc, c, bias, f, lut, res, rlo, rhi, out, rows, n)
  if (lut) { if (res) HAWQ_RQ(true, true); else HAWQ_RQ(true, false); }
  else { if (res) HAWQ_RQ(false, true); else HAWQ_RQ(false, false); }
#undef HAWQ_RQ
}
#endif

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
#ifdef HAWQ_AVX512
  const bool fast = split.empty() && (out_dtype == at::kChar || out_dtype == at::kInt) &&
                    (acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat) &&
                    requant16_fits(f, bp, n, rlo, rhi);
  if (fast) {
    const RqCols16 c = requant16_cols(f, bp, n);
    auto go = [&](auto* a) {
      if (out_dtype == at::kChar) requant16_dispatch(a, c, bp, f, lp, rp, rlo, rhi, out.data_ptr<int8_t>(), rows, n);
      else requant16_dispatch(a, c, bp, f, lp, rp, rlo, rhi, out.data_ptr<int32_t>(), rows, n);
    };
    if (acc.scalar_type() == at::kInt) go(acc.data_ptr<int32_t>());
    else go(acc.data_ptr<float>());
    return out;
  }
#endif
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
static inline i64 bit_length(i64 v) {  // 0 for v <= 0, as the loop it replaces
  return v > 0 ? 64 - __builtin_clzll((unsigned long long)v) : 0;
}
static inline i64 isqrt_newton(i64 v, int iters) {  // hawq.integer.layernorm.isqrt
  if (v == 0) return 0;
  if (iters >= 6 && v > 0) {
    // The reference's Newton steps from its start reach floor(sqrt v) after 6 (their
    // relative error falls 1 -> 0.25 -> 0.025 -> 3e-4 -> 5e-8 -> 1e-15: below one unit of a
    // 32-bit root after five; the floored iteration never drops below floor(sqrt v) and
    // stays there once reached; layernorm.isqrt), so with 6 or more steps the result is
    // floor(sqrt v): a float64 root (within 1 of it for v < 2^63) corrected exactly, in
    // uint64 ((r + 1)^2 <= 2^64 - 1 for r < 2^32), in place of 6+ 64-bit divisions.
    using u64 = uint64_t;
    u64 r = (u64)std::sqrt((double)v);
    while (r * r > (u64)v) --r;
    while ((r + 1) * (r + 1) <= (u64)v) ++r;
    return (i64)r;
  }
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
#ifdef HAWQ_AVX512
// The output stage of a row, 16 columns per step, all in float64 where every value is an
// integer (or an integer times a power of two) below 2^53, hence exact:
//   num = c 2^up + rt = a 2^(f+up) + (rt - mu 2^up): one FMA, exact when |mu| 2^up + rt
//     and |num| <= cmax 2^up + rt are below 2^53 (checked per row);
//   y = floor(num / (2 rt)): the float64 estimate is within 2^-20 of the quotient (< 2^31), one
//     FMA gives the exact remainder (an integer below 2^53), and a remainder outside
//     [0, 2 rt) -- rare: only a quotient within 2^-20 of an integer -- moves y by one;
//   out = round_half_even((y m + b) / 2^e) + z, clamped: (y m + b) 2^-e by one FMA with
//     m 2^-e and b 2^-e (exact doubles), exact when |y m + b| < 2^53 (per row: ymax max|m|
//     + max|b| < 2^53); vroundpd to nearest-even is rshift_round's half to even. Per column
//     (ln_cols_make) |m| < 2^31, |b| < 2^53, 0 <= e <= 62 and
//     ((2^31 |m| + |b|) >> e) + 1 + |z| < 2^31: the value fits int32 before + z and the clamp.
struct LnCols {
  bool ok;
  double mmax, bmax;            // max |m|, max |b|
  std::vector<double> mf, bf;   // per column, padded to 16: m 2^-e, b 2^-e
};
static LnCols ln_cols_make(const i64* m, const i64* e, const i64* b, i64 d, i64 z) {
  LnCols c;
  const i64 np = (d + 15) / 16 * 16;
  c.mf.assign(np, 0.0);
  c.bf.assign(np, 0.0);
  c.mmax = c.bmax = 0;
  c.ok = z >= -((i64)1 << 30) && z <= ((i64)1 << 30);
  for (i64 j = 0; j < d && c.ok; ++j) {
    const __int128 am = m[j] < 0 ? -(__int128)m[j] : m[j], ab = b[j] < 0 ? -(__int128)b[j] : b[j];
    const __int128 top = ((__int128)1 << 31) * am + ab;  // >= |y m + b| for |y| <= 2^31
    c.ok = am < ((__int128)1 << 31) && ab < ((__int128)1 << 53) && e[j] >= 0 && e[j] <= 62 &&
           (top >> e[j]) + 1 + (z < 0 ? -z : z) < ((__int128)1 << 31);
    c.mf[j] = std::ldexp((double)m[j], -(int)e[j]);
    c.bf[j] = std::ldexp((double)b[j], -(int)e[j]);
    c.mmax = std::max(c.mmax, (double)am);
    c.bmax = std::max(c.bmax, (double)ab);
  }
  return c;
}
template <typename TI> static inline __m512i load16_i32(const TI* p, __mmask16 k);
template <> inline __m512i load16_i32(const int32_t* p, __mmask16 k) { return _mm512_maskz_loadu_epi32(k, p); }
template <> inline __m512i load16_i32(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p));
}
template <typename TI, typename TO>
static void ln_row16(const TI* a, TO* o, i64 d, const LnCols& c, i64 f, i64 mu, i64 up, i64 rt,
                     i64 z, i64 lo, i64 hi) {
  const __m512d scale = _mm512_set1_pd(std::ldexp(1.0, (int)(f + up)));
  const __m512d off = _mm512_set1_pd((double)(rt - (mu << up)));
  const __m512d den = _mm512_set1_pd(2.0 * (double)rt), inv = _mm512_set1_pd(1.0 / (2.0 * (double)rt));
  const __m512i vz = _mm512_set1_epi32((int32_t)z), vlo = _mm512_set1_epi32((int32_t)lo);
  const __m512i vhi = _mm512_set1_epi32((int32_t)hi);
  for (i64 j = 0; j < d; j += 16) {
    const __mmask16 k = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
    const __m512i x = load16_i32(a + j, k);
    __m256i half[2];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512d xd = _mm512_cvtepi32_pd(h ? _mm512_extracti64x4_epi64(x, 1) : _mm512_castsi512_si256(x));
      const __m512d num = _mm512_fmadd_pd(xd, scale, off);
      const __m512d y = v_floor_fix(num, den, _mm512_roundscale_pd(_mm512_mul_pd(num, inv),
                                                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
      const __m512d v = _mm512_fmadd_pd(y, _mm512_loadu_pd(&c.mf[j + 8 * h]), _mm512_loadu_pd(&c.bf[j + 8 * h]));
      half[h] = _mm512_cvtpd_epi32(_mm512_roundscale_pd(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    __m512i out = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
    out = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(out, vz), vlo), vhi);
    store16(o + j, out, k);
  }
}
#endif

template <typename TI, typename TO>
static void layernorm_kernel(const TI* x, TO* out, i64 rows, i64 d, i64 f, i64 t, i64 k,
                             i64 eps_q, const i64* m, const i64* e, const i64* b, i64 z, i64 lo,
                             i64 hi, int iters) {
  using u64 = uint64_t;
  const i64 up = t + k + 1;
#ifdef HAWQ_AVX512
  constexpr bool narrow = !std::is_same<TI, i64>::value && !std::is_same<TO, i64>::value;
  const LnCols cols = narrow ? ln_cols_make(m, e, b, d, z) : LnCols{false, 0, 0, {}, {}};
  const bool lo_hi32 = lo >= INT32_MIN && hi <= INT32_MAX;
#endif
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
      if constexpr (narrow) {
        // ln_row16's conditions on the row: |num| <= cmax 2^up + rt < 2^53, |mu| 2^up + rt <
        // 2^53, |y| <= ymax = (cmax 2^up + rt) / (2 rt) + 1 < 2^31, ymax max|m| + max|b| < 2^53
        const i64 amu = mu < 0 ? -mu : mu;
        const i64 ymax = bit_length(cmax) + up + 1 < 53 ? ((cmax << up) + rt) / den + 1 : INT64_MAX;
        if (fast && cols.ok && lo_hi32 && ymax < ((i64)1 << 31) && bit_length(amu) + up + 1 < 53 &&
            (double)ymax * cols.mmax + cols.bmax < 0x1p52) {
          ln_row16(a, o, d, cols, f, mu, up, rt, z, lo, hi);
          continue;
        }
      }
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

// ---- the attention kernel, blocked (issue 28): four query rows at a time through both
// products (register tiles of 4 rows x up to 5 16-lane column blocks: 20 independent vpdpbusd
// chains, each operand load feeding 4 or 5 of them), and the softmax of those score rows in
// int32 lanes (softmax_rows32). Same integers as before; see the exactness notes at each step.

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements whose rows are r[0..16)
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 8)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}
// acc[r][c] = sum_k A[r][4k..4k+3] . B[k][16c..16c+15][0..3] (u8 x s8 -> int32, exact), for
// R rows of A (stride lda bytes) and C 16-column blocks of B (stride ldb columns), stored to
// out[r][16c + l] (stride ldo).
template <int R, int C>
static void vnni_tile(const uint8_t* A, i64 lda, const int8_t* B, i64 ldb, i64 k4, int32_t* out,
                      i64 ldo) {
  // (fully unrolled over r and c, so that gcc keeps the R C accumulators in registers)
  __m512i acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (i64 k = 0; k < k4; ++k) {
    const int8_t* bk = B + k * ldb * 4;
    __m512i b[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      b[c] = _mm512_loadu_si512(bk + 64 * c);
      asm("" : "+v"(b[c]));  // one load per block, not one per row (gcc folds it otherwise)
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + 4 * k, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) _mm512_storeu_si512(out + r * ldo + 16 * c, acc[r][c]);
}
// vnni_tile for any rows <= 4 and column blocks nb (in chunks of at most 5)
static void vnni_rows(i64 rows, i64 nb, const uint8_t* A, i64 lda, const int8_t* B, i64 ldb,
                      i64 k4, int32_t* out, i64 ldo) {
  for (i64 c0 = 0; c0 < nb; c0 += 5) {
    const i64 c = std::min<i64>(5, nb - c0);
    const int8_t* b = B + 16 * c0 * 4;
    int32_t* o = out + 16 * c0;
#define HAWQ_T(R_, C_) case R_ * 8 + C_: vnni_tile<R_, C_>(A, lda, b, ldb, k4, o, ldo); break;
#define HAWQ_R(R_) HAWQ_T(R_, 1) HAWQ_T(R_, 2) HAWQ_T(R_, 3) HAWQ_T(R_, 4) HAWQ_T(R_, 5)
    switch (rows * 8 + c) { HAWQ_R(1) HAWQ_R(2) HAWQ_R(3) HAWQ_R(4) }
#undef HAWQ_R
#undef HAWQ_T
  }
}

// A scalar requant (m, e, z, lo, hi) in int32 lanes: exact when |x| <= 2^31 (x int32 or a
// softmax quotient <= 2^30), |m| < 2^31, 0 <= e <= 62, (2^31 |m| >> e) + 1 + |z| < 2^31 and
// lo, hi in int32 (rq32_make sets ok) -- the bounds and the rounding of requant16 above.
struct Rq32 {
  bool ok;
  i64 m, hm, tie, e;  // hm = 2^(e-1) (0 at e = 0), tie = 2^e - 1 (all ones at e = 0)
  int32_t z, lo, hi;
};
static Rq32 rq32_make(const std::vector<int64_t>& f) {  // f = (m, e, z, lo, hi)
  Rq32 q{};
  const i64 m = f[0], e = f[1], z = f[2];
  auto fits32 = [](i64 v) { return v >= INT32_MIN && v <= INT32_MAX; };
  q.ok = fits32(m) && e >= 0 && e <= 62 && fits32(z) && fits32(f[3]) && fits32(f[4]);
  if (q.ok) {
    const __int128 top = ((__int128)1 << 31) * (m < 0 ? -(__int128)m : (__int128)m);
    q.ok = (top >> e) + 1 + (z < 0 ? -(__int128)z : (__int128)z) < ((__int128)1 << 31);
  }
  q.m = m; q.e = e;
  q.hm = e > 0 ? (i64)1 << (e - 1) : 0;
  q.tie = e > 0 ? ((i64)1 << e) - 1 : -1;
  q.z = (int32_t)z; q.lo = (int32_t)f[3]; q.hi = (int32_t)f[4];
  return q;
}
// 8 int64 lanes holding values below 2^31 in magnitude -> the requant, still in int64 lanes
static inline v8 rq32_lanes(v8 x, const Rq32& q) {
  const v8 vh = _mm512_add_epi64(_mm512_mul_epi32(x, _mm512_set1_epi64(q.m)), _mm512_set1_epi64(q.hm));
  return v_round_tie(vh, _mm512_set1_epi64(q.e), _mm512_set1_epi64(q.tie));
}

// IntSoftmax of int32 score rows + the scalar requant p_rq, in 16 int32 lanes:
// pu[j] = P_j + 128 (u8; pu[n..) untouched) and the row sum of P. Preconditions
// (softmax32_make sets ok): |shift| <= 62, 1 <= q_ln2 < 2^18, table entries in [0, 2^31) with
// T[0] > 0, 0 <= kbits <= 30, n < 2^22, p_rq an Rq32 with -128 <= lo <= hi <= 127. Steps:
//  1. q = S 2^shift or rshift_round(S, -shift); only mx - q matters. shift >= 0:
//     d = max S - S in uint32 (exact: both int32), nq = min(d 2^shift, cap) computed as
//     d > cap >> shift ? cap : d << shift (cap = 33 q_ln2 - 1 < 2^24; a count >= 32 gives 0).
//     shift < 0: q = floor(S / 2^s) + carry (half to even) in int32 (s >= 32: q = 0, as
//     |S| <= 2^31), d = max q - q <= 2^31 in uint32, nq = min(d, cap). The cap changes
//     nothing: the reference's z = min(floor(nq / q_ln2), 32), r = min(nq - z q_ln2,
//     q_ln2 - 1) are 32 and q_ln2 - 1 for every nq >= 33 q_ln2 - 1, and with nq <= cap they
//     need no clamps (z <= 32, r <= q_ln2 - 1).
//  2. z = floor(nq / q_ln2): nq < 2^24 is exact in float32, the float32 estimate is within
//     2^-17 of the quotient (< 33), one correction with the exact remainder (vpmulld,
//     v_divmod_fix) makes it the floor. ex = T[r] >> z (vpsrlvd: a count of 32 gives 0, as
//     the reference's int64 shift of T < 2^31).
//  3. p = floor(ex 2^k / total): ex 2^k / total is computed as ex / (total 2^-k): ex < 2^31
//     and total 2^-k (total = sum ex < 2^52) are exact in float64, the estimate of the
//     quotient (<= 2^30) is within 2^-21, and one FMA gives the exact remainder, 2^-k times an
//     integer below 2^53 (v_floor_fix). Then P = clamp(rshift_round(p m, e) + z, lo, hi):
//     for k <= 22, p m < 2^53, so p (m 2^-e) is exact in float64 and vroundpd to nearest
//     even is rshift_round; else in int64 lanes (Rq32).
struct Softmax32 {
  bool ok;
  i64 sh, rs;          // shift >= 0: sh = shift, rs = 0; else sh = 0, rs = -shift
  int32_t cap, capd;   // cap = 33 q_ln2 - 1 (z = 32, r = q_ln2 - 1 from there on), cap >> sh
  int32_t q_ln2;
  float inv_ln2;
  const int32_t* table;
  double two_k;
  i64 kbits;
  Rq32 rq;
  bool float_rq;  // kbits <= 22: p m < 2^53, so p (m 2^-e) is exact in float64
  double mf;      // m 2^-e
};
static Softmax32 softmax32_make(i64 shift, i64 q_ln2, const torch::Tensor& table, i64 kbits, i64 n,
                                const std::vector<int64_t>& prq) {
  Softmax32 s{};
  s.rq = rq32_make(prq);
  const int32_t* t = table.data_ptr<int32_t>();
  const i64 nt = table.numel();
  s.ok = s.rq.ok && prq[3] >= -128 && prq[4] <= 127 && shift >= -62 && shift <= 62 &&
         q_ln2 >= 1 && q_ln2 < ((i64)1 << 18) && nt >= q_ln2 && t[0] > 0 && kbits >= 0 &&
         kbits <= 30 && n < ((i64)1 << 22) && std::all_of(t, t + q_ln2, [](int32_t v) { return v >= 0; });
  s.sh = shift >= 0 ? shift : 0;
  s.rs = shift >= 0 ? 0 : -shift;
  s.cap = (int32_t)((MAX_Z + 1) * q_ln2 - 1);  // z <= 32 and r <= q_ln2 - 1 without clamps
  s.capd = s.sh >= 32 ? 0 : (int32_t)(s.cap >> s.sh);
  s.q_ln2 = (int32_t)q_ln2;
  s.inv_ln2 = 1.0f / (float)q_ln2;
  s.table = t;
  s.two_k = std::ldexp(1.0, (int)kbits);
  s.kbits = kbits;
  s.float_rq = kbits <= 22;
  s.mf = std::ldexp((double)prq[0], -(int)std::max<i64>(0, std::min<i64>(prq[1], 62)));
  return s;
}
static inline __mmask16 mask16(i64 left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}
// z = floor(nq / d), r = nq - z d for 0 <= nq < 2^24, 1 <= d < 2^18, from an estimate z within
// one (the float32 one): the exact remainder moves it by one when outside [0, d) -- rare
// (a quotient within 2^-17 of an integer); check_divmod_fix exercises it.
static inline void v_divmod_fix(__m512i nq, __m512i d, __m512i& z, __m512i& r) {
  const __m512i one = _mm512_set1_epi32(1);
  r = _mm512_sub_epi32(nq, _mm512_mullo_epi32(z, d));
  const __mmask16 neg = _mm512_cmplt_epi32_mask(r, _mm512_setzero_si512());
  const __mmask16 big = _mm512_cmpge_epi32_mask(r, d);
  if (__builtin_expect((neg | big) != 0, 0)) {
    z = _mm512_mask_sub_epi32(z, neg, z, one);
    r = _mm512_mask_add_epi32(r, neg, r, d);
    z = _mm512_mask_add_epi32(z, big, z, one);
    r = _mm512_mask_sub_epi32(r, big, r, d);
  }
}
// rshift_round(v, s) of int32 lanes for 1 <= s <= 31: floor(v / 2^s) plus the half-to-even
// carry (remainder above half, or at half with an odd floor) -- no overflow, unlike v + half
static inline __m512i rshift_round32(__m512i v, __m512i s, __m512i low, __m512i half) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i q = _mm512_srav_epi32(v, s), rem = _mm512_and_si512(v, low);
  const __mmask16 up = _mm512_cmpgt_epu32_mask(rem, half) |
                       (_mm512_cmpeq_epi32_mask(rem, half) & _mm512_test_epi32_mask(q, one));
  return _mm512_mask_add_epi32(q, up, q, one);
}
// R <= 4 rows at once (S rows ldS apart, their maxima in smax, pu rows ldp apart, buf rows
// ldb apart), pass by pass: the rows are independent, so each pass has R times the work in
// flight (the table gathers and the reductions between the passes are latency-bound one row
// at a time). The row maximum of the working-scale scores is that of S shifted (both shifts
// are non-decreasing), so there is no separate pass for it.
static void softmax_rows32(const int32_t* S, i64 ldS, const int32_t* smax, i64 R, i64 n,
                           const Softmax32& P, int32_t* buf, i64 ldb, uint8_t* pu, i64 ldp,
                           int32_t* psum_out) {
  const i64 rs = std::min<i64>(std::max<i64>(P.rs, 1), 31);
  const __m512i rsv = _mm512_set1_epi32((int32_t)rs);
  const __m512i low = _mm512_set1_epi32((int32_t)(((i64)1 << rs) - 1));
  const __m512i rhalf = _mm512_set1_epi32((int32_t)((i64)1 << (rs - 1)));
  auto working = [&](__m512i v) {  // the working-scale score, up to the left shift
    if (P.rs == 0) return v;
    if (P.rs >= 32) return _mm512_setzero_si512();  // |v| <= 2^31: rounds to 0
    return rshift_round32(v, rsv, low, rhalf);
  };
  int32_t mxs[4];
  for (i64 r = 0; r < R; ++r) mxs[r] = _mm512_cvtsi512_si32(working(_mm512_set1_epi32(smax[r])));
  // 2. nq = min(mx - q, cap) (see above), z, r, ex = T[r] >> z into buf, total in int64
  const __m512i cap = _mm512_set1_epi32(P.cap), capd = _mm512_set1_epi32(P.capd);
  const __m512i sh = _mm512_set1_epi32((int32_t)std::min<i64>(P.sh, 32));
  const __m512i ln2 = _mm512_set1_epi32(P.q_ln2);
  const __m512 inv = _mm512_set1_ps(P.inv_ln2);
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFll);
  i64 totals[4];
  for (i64 r = 0; r < R; ++r) {
    const __m512i mx = _mm512_set1_epi32(mxs[r]);
    __m512i tot = _mm512_setzero_si512();
    for (i64 j = 0; j < n; j += 16) {
      const __mmask16 k = mask16(n - j);
      const __m512i d = _mm512_sub_epi32(mx, working(_mm512_maskz_loadu_epi32(k, S + r * ldS + j)));  // uint32
      const __m512i nq = _mm512_mask_mov_epi32(_mm512_sllv_epi32(d, sh), _mm512_cmpgt_epu32_mask(d, capd), cap);
      __m512i z = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(nq), inv)), rr;
      v_divmod_fix(nq, ln2, z, rr);
      const __m512i ex = _mm512_srlv_epi32(
          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, rr, P.table, 4), z);
      _mm512_mask_storeu_epi32(buf + r * ldb + j, k, ex);
      tot = _mm512_add_epi64(tot, _mm512_add_epi64(_mm512_and_si512(ex, lo32), _mm512_srli_epi64(ex, 32)));
    }
    totals[r] = _mm512_reduce_add_epi64(tot);
  }
  // 3. p = floor(ex 2^k / total) in float64, the requant, pu = P + 128, sum P
  const Rq32& q = P.rq;
  const __m512i z32 = _mm512_set1_epi32(q.z), lo = _mm512_set1_epi32(q.lo), hi = _mm512_set1_epi32(q.hi);
  const __m512d mf = _mm512_set1_pd(P.mf);
  for (i64 r = 0; r < R; ++r) {
    // p = floor(ex 2^k / total) from ex (2^k / total), the remainder as (ex 2^k - p total) 2^-k
    const __m512d tk = _mm512_set1_pd(std::ldexp((double)totals[r], -(int)P.kbits));  // exact
    const __m512d kinv = _mm512_set1_pd(P.two_k / (double)totals[r]);
    __m512i psum = _mm512_setzero_si512();
    for (i64 j = 0; j < n; j += 16) {
      const __mmask16 k = mask16(n - j);
      const __m512i ex = _mm512_maskz_loadu_epi32(k, buf + r * ldb + j);
      __m256i half[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512d exd = _mm512_cvtepi32_pd(h ? _mm512_extracti64x4_epi64(ex, 1) : _mm512_castsi512_si256(ex));
        // (num, den) = (ex, total 2^-k): ex 2^k / total scaled by 2^-k, exactly
        const __m512d p = v_floor_fix(exd, tk, _mm512_roundscale_pd(_mm512_mul_pd(exd, kinv),
                                                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
        if (P.float_rq) {  // rshift_round(p m, e) = round_half_even(p (m 2^-e)), exact
          half[h] = _mm512_cvtpd_epi32(_mm512_roundscale_pd(_mm512_mul_pd(p, mf), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
          half[h] = _mm512_cvtepi64_epi32(rq32_lanes(_mm512_cvtpd_epi64(p), q));
        }
      }
      __m512i pv = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
      pv = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(pv, z32), lo), hi);
      psum = _mm512_mask_add_epi32(psum, k, psum, pv);
      _mm512_mask_cvtepi32_storeu_epi8(pu + r * ldp + j, k, _mm512_add_epi32(pv, _mm512_set1_epi32(128)));
    }
    psum_out[r] = _mm512_reduce_add_epi32(psum);
  }
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
  const Softmax32 P32 = softmax32_make(shift, q_ln2, table, kbits, T, prq);
  const Rq32 O32 = rq32_make(orq);
  const i64 hd4 = round_up(hd, 4), hd16 = round_up(hd, 16), T4 = round_up(T, 4),
            T16 = round_up(T, 16);
  const int32_t s_bias = (int32_t)(hd * zq * zk), o_bias = (int32_t)(T * zp * zv);
  at::parallel_for(0, B * H, 1, [&](i64 p0, i64 p1) {
    std::vector<uint8_t> qu(T * hd4), pu(4 * T4);
    std::vector<int8_t> kp(hd4 * T16), vp(T4 * hd16);
    std::vector<int32_t> S(4 * T16), Ob(4 * hd16), rq(T), prow(T), buf32(4 * T16);
    std::vector<int32_t> colS(T16), colO(hd16);  // the column terms of S and O
    std::vector<i64> buf(T);
    const __m512i v128zq = _mm512_set1_epi32((int32_t)(128 + zq));
    const __m512i v128zp = _mm512_set1_epi32((int32_t)(128 + zp));
    const v8 om = _mm512_set1_epi64(orq[0]), oe = _mm512_set1_epi64(orq[1]);
    const v8 oz = _mm512_set1_epi64(orq[2]), olo = _mm512_set1_epi64(orq[3]);
    const v8 ohi = _mm512_set1_epi64(orq[4]);
    for (i64 pr = p0; pr < p1; ++pr) {
      const i64 b = pr / H, h = pr % H;
      auto row = [&](i64 t, i64 s) { return src + (((b * T + t) * 3 + s) * H + h) * hd; };
      // operands: q + 128 as u8 rows; k as kp[d/4][j][4] (a 4-byte transpose: 16 x 16 blocks
      // in registers when hd is a multiple of 64, else int32 gathers); v as vp[j/4][d][4] (4
      // rows interleaved bytewise); sums of k and v rows by VNNI with an all-ones u8 operand,
      // folded at once into the column terms of S and O
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
        if (hd % 64 == 0) {  // 16 tokens x 64 bytes: 16 loads and 64 shuffles for 16 gathers
          for (i64 d0 = 0; d0 < hd; d0 += 64) {
            __m512i g[16];
            for (int u = 0; u < 16; ++u)
              g[u] = j0 + u < T ? _mm512_loadu_si512(row(j0 + u, 1) + d0) : _mm512_setzero_si512();
            transpose16(g);
            for (int u = 0; u < 16; ++u) {
              _mm512_storeu_si512(&kp[((d0 / 4 + u) * T16 + j0) * 4], g[u]);
              sum = _mm512_dpbusd_epi32(sum, ones, g[u]);
            }
          }
        } else {
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
        }
        // the column terms of the scores: hd zq zk - (128 + zq) colsum(k)
        _mm512_storeu_si512(&colS[j0], _mm512_sub_epi32(_mm512_set1_epi32(s_bias), _mm512_mullo_epi32(v128zq, sum)));
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
        // the column terms of the output: T zp zv - (128 + zp) colsum(v)
        _mm512_storeu_si512(&colO[d0], _mm512_sub_epi32(_mm512_set1_epi32(o_bias), _mm512_mullo_epi32(v128zp, sum)));
      }
      // four query rows at a time: scores, softmax rows, then the output rows
      for (i64 i0 = 0; i0 < T; i0 += 4) {
        const i64 R = std::min<i64>(4, T - i0);
        vnni_rows(R, T16 / 16, &qu[i0 * hd4], hd4, kp.data(), T16, hd4 / 4, S.data(), T16);
        int32_t sp[4], smax[4];
        for (i64 r = 0; r < R; ++r) {  // the zero-point terms of the scores, the row maxima
          int32_t* s = &S[r * T16];
          const __m512i zrow = _mm512_set1_epi32((int32_t)(-zk * rq[i0 + r]));
          __m512i vmx = _mm512_set1_epi32(INT32_MIN);
          for (i64 j0 = 0; j0 < T16; j0 += 16) {
            const __m512i v = _mm512_add_epi32(_mm512_add_epi32(_mm512_loadu_si512(s + j0),
                                                                _mm512_loadu_si512(&colS[j0])), zrow);
            _mm512_storeu_si512(s + j0, v);
            vmx = _mm512_mask_max_epi32(vmx, mask16(T - j0), vmx, v);
          }
          smax[r] = _mm512_reduce_max_epi32(vmx);
        }
        if (P32.ok) {
          softmax_rows32(S.data(), T16, smax, R, T, P32, buf32.data(), T16, pu.data(), T4, sp);
        } else {  // the int64 row of the softmax op
          for (i64 r = 0; r < R; ++r) {
            softmax_row(&S[r * T16], prow.data(), T, P, buf.data());
            __m512i vsp = _mm512_setzero_si512();
            for (i64 j = 0; j < T; j += 16) {
              const __mmask16 km = mask16(T - j);
              const __m512i pv = _mm512_maskz_loadu_epi32(km, &prow[j]);
              vsp = _mm512_add_epi32(vsp, pv);
              _mm512_mask_cvtepi32_storeu_epi8(&pu[r * T4 + j], km, _mm512_add_epi32(pv, _mm512_set1_epi32(128)));
            }
            sp[r] = _mm512_reduce_add_epi32(vsp);
          }
        }
        vnni_rows(R, hd16 / 16, pu.data(), T4, vp.data(), hd16, T4 / 4, Ob.data(), hd16);
        for (i64 r = 0; r < R; ++r) {  // O: zero-point terms, requant, stored at (b, i, h hd + d)
          const i64 i = i0 + r;
          const __m512i zo = _mm512_set1_epi32((int32_t)(-zv * sp[r]));
          int8_t* o = dst + (b * T + i) * H * hd + h * hd;
          for (i64 d0 = 0; d0 < hd16; d0 += 16) {
            const __m512i acc = _mm512_add_epi32(_mm512_add_epi32(_mm512_loadu_si512(&Ob[r * hd16 + d0]),
                                                                  _mm512_loadu_si512(&colO[d0])), zo);
            const __mmask16 km = mask16(hd - d0);
            if (O32.ok) {  // int32 lanes: even / odd products as in requant16
              const v8 ve = rq32_lanes(acc, O32), vo = rq32_lanes(_mm512_srli_epi64(acc, 32), O32);
              __m512i x = _mm512_mask_blend_epi32(0xAAAA, ve, _mm512_slli_epi64(vo, 32));
              x = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(O32.z)),
                                                    _mm512_set1_epi32(O32.lo)), _mm512_set1_epi32(O32.hi));
              if (km == 0xFFFF) _mm_storeu_si128((__m128i*)(o + d0), _mm512_cvtepi32_epi8(x));
              else _mm512_mask_cvtepi32_storeu_epi8(o + d0, km, x);
              continue;
            }
            for (int half = 0; half < 2; ++half) {
              const i64 dd = d0 + 8 * half;
              if (dd >= hd) break;
              v8 x = _mm512_cvtepi32_epi64(half ? _mm512_extracti64x4_epi64(acc, 1)
                                                : _mm512_castsi512_si256(acc));
              x = _mm512_add_epi64(v_rshift_round(_mm512_mullo_epi64(x, om), oe), oz);
              store8(o + dd, v_clamp(x, olo, ohi), tail_mask(hd - dd));
            }
          }
        }
      }
    }
  });
  return out;
}
#endif

// ---------------------------------------------------------------------------- test hooks
// The rare branches of the kernels' divisions, called on chosen inputs by
// tests/integer/test_cpu_kernels.py (estimates forced one off, roots next to squares).
torch::Tensor check_isqrt(torch::Tensor v, int64_t iters) {
  v = v.contiguous();
  auto out = torch::empty_like(v);
  for (i64 i = 0; i < v.numel(); ++i) out.data_ptr<i64>()[i] = isqrt_newton(v.data_ptr<i64>()[i], (int)iters);
  return out;
}
#ifdef HAWQ_AVX512
torch::Tensor check_floor_fix(torch::Tensor num, torch::Tensor den, torch::Tensor q) {
  TORCH_CHECK(num.numel() % 8 == 0 && num.scalar_type() == at::kDouble, "check_floor_fix: float64, 8k");
  num = num.contiguous(); den = den.contiguous(); q = q.contiguous();
  auto out = torch::empty_like(q);
  for (i64 i = 0; i < num.numel(); i += 8)
    _mm512_storeu_pd(out.data_ptr<double>() + i, v_floor_fix(_mm512_loadu_pd(num.data_ptr<double>() + i),
                                                            _mm512_loadu_pd(den.data_ptr<double>() + i),
                                                            _mm512_loadu_pd(q.data_ptr<double>() + i)));
  return out;
}
#endif
#ifdef HAWQ_VNNI  // (the int32 softmax helpers live with the attention kernel)
torch::Tensor check_rshift_round32(torch::Tensor v, int64_t s) {  // 1 <= s <= 31
  TORCH_CHECK(v.numel() % 16 == 0 && v.scalar_type() == at::kInt && s >= 1 && s <= 31, "check_rshift_round32");
  v = v.contiguous();
  auto out = torch::empty_like(v);
  const __m512i sv = _mm512_set1_epi32((int32_t)s), low = _mm512_set1_epi32((int32_t)(((i64)1 << s) - 1));
  const __m512i half = _mm512_set1_epi32((int32_t)((i64)1 << (s - 1)));
  for (i64 i = 0; i < v.numel(); i += 16)
    _mm512_storeu_si512(out.data_ptr<int32_t>() + i,
                        rshift_round32(_mm512_loadu_si512(v.data_ptr<int32_t>() + i), sv, low, half));
  return out;
}
torch::Tensor check_divmod_fix(torch::Tensor nq, int64_t d, torch::Tensor z) {
  TORCH_CHECK(nq.numel() % 16 == 0 && nq.scalar_type() == at::kInt, "check_divmod_fix: int32, 16k");
  nq = nq.contiguous(); z = z.contiguous();
  auto out = torch::empty({2, nq.numel()}, nq.options());
  for (i64 i = 0; i < nq.numel(); i += 16) {
    __m512i zz = _mm512_loadu_si512(z.data_ptr<int32_t>() + i), r;
    v_divmod_fix(_mm512_loadu_si512(nq.data_ptr<int32_t>() + i), _mm512_set1_epi32((int32_t)d), zz, r);
    _mm512_storeu_si512(out.data_ptr<int32_t>() + i, zz);
    _mm512_storeu_si512(out.data_ptr<int32_t>() + nq.numel() + i, r);
  }
  return out;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("requant", &requant);
  mod.def("softmax", &softmax);
  mod.def("layernorm", &layernorm);
  mod.def("pad_u8", &pad_u8);
  mod.def("check_isqrt", &check_isqrt);
#ifdef HAWQ_AVX512
  mod.def("check_floor_fix", &check_floor_fix);
#endif
#ifdef HAWQ_VNNI
  mod.def("attention_int8", &attention_int8);
  mod.def("check_divmod_fix", &check_divmod_fix);
  mod.def("check_rshift_round32", &check_rshift_round32);
#endif
}
