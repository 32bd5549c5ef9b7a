// Fused per-sample forward of an SLO-aware MLP at one level, on the CPU, one thread.
//
// Same semantics as workers/model.py's reference (each hidden layer keeps each
// input's top-k pre-activations, then ReLU) and as the "gather" kernels of
// workers/kernels.py: a layer fed by a sparse hidden vector reads only the rows
// of W.T of the units a sample kept that survived ReLU (no weight copy), and
// the whole forward is one call, so nothing between two gathers goes through
// Python or torch's dispatcher. Loaded with ctypes by workers/native.py, which
// compiles this file with the machine's C++ compiler (-O3 -march=native).
//
// Why not torch.nn.functional.embedding_bag: at batch 1 its bf16 bag is
// compute-bound (~0.9 us a 4096-wide row even from cache);
// converting bf16 to fp32 by a 16-bit shift and FMA-ing eight rows per pass
// over the output keeps the loop on memory bandwidth.
//
// Weights: row-major W.T (in x out), fp32 or bf16 (accumulated in fp32); the
// first layer (dense, fed by the raw input) is always fp32. Biases fp32.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SLONN_AVX512 1
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

// y[0:n] += v[j] * w[idx[j], 0:n] for j < k, one row at a time over columns [from, n).
template <typename W>
void axpy_rows_scalar(const W* w, int64_t n, const int32_t* idx, const float* v, int64_t k, float* y,
                      int64_t from) {
  for (int64_t j = 0; j < k; ++j) {
    const W* row = w + static_cast<int64_t>(idx[j]) * n;
    const float a = v[j];
    for (int64_t o = from; o < n; ++o) y[o] += load(row, o) * a;
  }
}

#ifdef SLONN_AVX512
inline void load32(const uint16_t* p, __m512& lo, __m512& hi) {
  const __m512i w = _mm512_loadu_si512(static_cast<const void*>(p));
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
}

inline void load32(const float* p, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(p);
  hi = _mm512_loadu_ps(p + 16);
}

// Eight rows per pass over 32 output columns: y is read and written once per eight rows.
constexpr int kGroup = 8;

template <typename W>
void axpy_rows(const W* w, int64_t n, const int32_t* idx, const float* v, int64_t k, float* y) {
  const int64_t nv = n - n % 32;
  int64_t j = 0;
  for (; j + kGroup <= k; j += kGroup) {
    const W* r[kGroup];
    __m512 a[kGroup];
    for (int g = 0; g < kGroup; ++g) {
      r[g] = w + static_cast<int64_t>(idx[j + g]) * n;
      a[g] = _mm512_set1_ps(v[j + g]);
    }
    for (int64_t o = 0; o < nv; o += 32) {
      __m512 acc0 = _mm512_loadu_ps(y + o), acc1 = _mm512_loadu_ps(y + o + 16);
      for (int g = 0; g < kGroup; ++g) {
        __m512 lo, hi;
        load32(r[g] + o, lo, hi);
        acc0 = _mm512_fmadd_ps(lo, a[g], acc0);
        acc1 = _mm512_fmadd_ps(hi, a[g], acc1);
      }
      _mm512_storeu_ps(y + o, acc0);
      _mm512_storeu_ps(y + o + 16, acc1);
    }
  }
  for (; j < k; ++j) {
    const W* row = w + static_cast<int64_t>(idx[j]) * n;
    const __m512 a = _mm512_set1_ps(v[j]);
    for (int64_t o = 0; o < nv; o += 32) {
      __m512 lo, hi;
      load32(row + o, lo, hi);
      _mm512_storeu_ps(y + o, _mm512_fmadd_ps(lo, a, _mm512_loadu_ps(y + o)));
      _mm512_storeu_ps(y + o + 16, _mm512_fmadd_ps(hi, a, _mm512_loadu_ps(y + o + 16)));
    }
  }
  if (nv < n) axpy_rows_scalar(w, n, idx, v, k, y, nv);
}
#else
// Portable: four rows per pass (the compiler vectorises the column loop).
template <typename W>
void axpy_rows(const W* w, int64_t n, const int32_t* idx, const float* v, int64_t k, float* __restrict y) {
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const W* r0 = w + static_cast<int64_t>(idx[j]) * n;
    const W* r1 = w + static_cast<int64_t>(idx[j + 1]) * n;
    const W* r2 = w + static_cast<int64_t>(idx[j + 2]) * n;
    const W* r3 = w + static_cast<int64_t>(idx[j + 3]) * n;
    const float a0 = v[j], a1 = v[j + 1], a2 = v[j + 2], a3 = v[j + 3];
    for (int64_t o = 0; o < n; ++o)
      y[o] += load(r0, o) * a0 + load(r1, o) * a1 + load(r2, o) * a2 + load(r3, o) * a3;
  }
  axpy_rows_scalar(w, n, idx + j, v + j, k - j, y, 0);
}
#endif

// The units of z[0:n] among its k largest values that are > 0 (ReLU keeps only those), as (idx, v), in
// increasing unit order (rows are then read in address order); returns how many. Ties at the k-th value are
// broken by unit index (lowest first).
//
// 1. The positive units are compacted into (idx, v) (AVX-512 compress-stores where built for it).
// 2. If more than k: a positive float's bit pattern orders like its value, so a histogram of the top 12
//    bits of the compacted values finds the bin holding the k-th largest; only that bin's values are
//    partially sorted (std::nth_element) for the exact threshold.
// 3. (idx, v) are compacted again in place to the values above it, plus ties while room is left.
// Every pass is branch-free: whether a unit passes is a coin flip the branch predictor loses. Per 4096-wide
// layer ~55 us with std::nth_element over the row, ~30 us with a histogram over the whole row, less now.
constexpr int kBinShift = 20;
constexpr int kBins = 1 << (32 - 1 - kBinShift);  // sign bit is 0 for positive values

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

int64_t compact_positive(const float* z, int64_t n, int32_t* idx, float* v) {
  int64_t m = 0, i = 0;
#ifdef SLONN_AVX512
  const __m512i step = _mm512_set1_epi32(16);
  __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16, lanes = _mm512_add_epi32(lanes, step)) {
    const __m512 x = _mm512_loadu_ps(z + i);
    const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(idx + m, pos, lanes);
    _mm512_mask_compressstoreu_ps(v + m, pos, x);
    m += __builtin_popcount(pos);
  }
#endif
  for (; i < n; ++i) {
    idx[m] = static_cast<int32_t>(i);
    v[m] = z[i];
    m += z[i] > 0.0f;
  }
  return m;
}

int64_t select_positive_topk(const float* z, int64_t n, int64_t k, std::vector<float>& tmp, int32_t* idx,
                             float* v) {
  const int64_t m = compact_positive(z, n, idx, v);
  if (m <= k) return m;  // every positive unit is among the top k
  uint32_t count[kBins] = {};
  for (int64_t j = 0; j < m; ++j) ++count[bits_of(v[j]) >> kBinShift];
  int64_t above = 0;
  uint32_t bin = kBins - 1;
  while (above + count[bin] < k) above += count[bin--];
  tmp.resize(count[bin] + 1);
  int64_t t = 0;
  for (int64_t j = 0; j < m; ++j) {
    tmp[t] = v[j];
    t += (bits_of(v[j]) >> kBinShift) == bin;
  }
  const int64_t need = k - above;  // 1 <= need <= count[bin] == t
  std::nth_element(tmp.begin(), tmp.begin() + (need - 1), tmp.begin() + t, std::greater<float>());
  const float threshold = tmp[need - 1];  // the k-th largest value, > 0
  int64_t greater = 0;
  for (int64_t j = 0; j < m; ++j) greater += v[j] > threshold;
  int64_t room = k - greater;  // >= 1: units equal to the threshold that still fit
  int64_t out = 0;
  for (int64_t j = 0; j < m; ++j) {
    const float x = v[j];
    const bool tie = x == threshold;
    const bool take = x > threshold || (tie && room > 0);
    room -= tie & take;
    idx[out] = idx[j];
    v[out] = x;
    out += take;
  }
  return out;
}

struct Scratch {
  std::vector<float> z, y, tmp, v;
  std::vector<int32_t> idx;
  std::vector<int64_t> m;
};

// The whole batch, layer by layer, each sample reading its own rows. Layer by layer rather than sample by
// sample runs ~1.6x faster at batch 16-64, keep 0.5 (14 vs 22-24 ms at batch 16), rows several samples keep
// being still cached for the next. One L2-sized band of a layer's rows at a time for the whole batch (each
// row fetched from memory about once) gains nothing at batch 2-64, so fetching rows is not what bounds it
// there; nor does a union gather (one row, every sample that keeps it: 2x slower, each row then updates
// whole output rows one at a time instead of eight rows' worth at once).
template <typename W>
void forward_batch(int64_t batch, const float* x, int64_t in_features, const float* first_wt,
                   const float* first_b, int64_t first_out, int64_t n_layers, const void* const* wts,
                   const float* const* biases, const int64_t* outs, const int64_t* ks, float* out,
                   int64_t widest, Scratch& sc) {
  sc.z.resize(batch * widest);
  sc.y.resize(batch * widest);
  sc.v.resize(batch * widest);
  sc.idx.resize(std::max(batch * widest, in_features));
  sc.m.resize(batch);
  for (int64_t i = 0; i < in_features; ++i) sc.idx[i] = static_cast<int32_t>(i);
  for (int64_t s = 0; s < batch; ++s) {
    float* zs = sc.z.data() + s * widest;
    std::memcpy(zs, first_b, sizeof(float) * first_out);
    axpy_rows(first_wt, first_out, sc.idx.data(), x + s * in_features, in_features, zs);
  }
  int64_t width = first_out;
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t n = outs[l], k = std::min(ks[l], width);
    for (int64_t s = 0; s < batch; ++s)
      sc.m[s] = select_positive_topk(sc.z.data() + s * widest, width, k, sc.tmp, sc.idx.data() + s * widest,
                                     sc.v.data() + s * widest);
    const bool last = l + 1 == n_layers;
    float* dst = last ? out : sc.y.data();
    const int64_t dst_stride = last ? n : widest;
    for (int64_t s = 0; s < batch; ++s) std::memcpy(dst + s * dst_stride, biases[l], sizeof(float) * n);
    const W* w = static_cast<const W*>(wts[l]);
    for (int64_t s = 0; s < batch; ++s)
      axpy_rows(w, n, sc.idx.data() + s * widest, sc.v.data() + s * widest, sc.m[s], dst + s * dst_stride);
    if (!last) sc.z.swap(sc.y);
    width = n;
  }
}

}  // namespace

extern "C" {

// Version of this interface; workers/native.py checks it.
int slonn_abi_version() { return 2; }

// Logits of a batch: out[b, :] for b < batch, row-major (batch x outs[n_layers - 1]).
//   x: batch x in_features fp32; first_wt: in_features x first_out fp32 (W1.T, input scaling folded in);
//   wts[l]: W_l.T (width x outs[l]), fp32 (bf16 == 0) or bf16 (bf16 == 1); layer l is fed by the previous
//   layer's output of width first_out (l == 0) or outs[l - 1], of which each sample keeps its ks[l] largest.
// Returns 0, or -1 when an argument is out of range (nothing written).
int slonn_sparse_forward(int64_t batch, const float* x, int64_t in_features, const float* first_wt,
                         const float* first_b, int64_t first_out, int64_t n_layers, const void* const* wts,
                         const float* const* biases, const int64_t* outs, const int64_t* ks, int32_t bf16,
                         float* out) {
  if (batch < 0 || in_features < 1 || first_out < 1 || n_layers < 1) return -1;
  int64_t widest = std::max(in_features, first_out);
  for (int64_t l = 0; l < n_layers; ++l) {
    if (outs[l] < 1 || ks[l] < 1) return -1;
    widest = std::max(widest, outs[l]);
  }
  if (widest > INT32_MAX) return -1;
  static thread_local Scratch sc;
  if (bf16)
    forward_batch<uint16_t>(batch, x, in_features, first_wt, first_b, first_out, n_layers, wts, biases, outs, ks,
                            out, widest, sc);
  else
    forward_batch<float>(batch, x, in_features, first_wt, first_b, first_out, n_layers, wts, biases, outs, ks,
                         out, widest, sc);
  return 0;
}

}  // extern "C"
