// Statistics collected batch by batch during calibration: value histograms and per-channel ranges.
// Every kernel updates its output in place and returns the number of NaN/Inf inputs it saw; when
// that number is not zero the output is left untouched, so one bad batch cannot poison the
// statistics gathered so far.
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tvm_compress {

namespace {

// Bin of an already scaled value t = (v - lo) * nbins / (hi - lo); out-of-range values clamp into
// the end bins, NaN goes to bin 0 (NaN inputs are counted and discarded anyway). On x86 the clamp
// is maxsd/minsd: GCC compiles the ternaries to a branch, which mispredicts on ReLU outputs.
inline int64_t BinIndex(double t, double last_bin) {
#if defined(__SSE2__)
  const __m128d low = _mm_max_sd(_mm_set_sd(t), _mm_setzero_pd());
  const __m128d clamped = _mm_min_sd(low, _mm_set_sd(last_bin));
  return static_cast<int64_t>(_mm_cvtsd_f64(clamped));
#else
  t = t > 0.0 ? t : 0.0;
  t = t < last_bin ? t : last_bin;
  return static_cast<int64_t>(t);
#endif
}

inline bool NonFinite(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// Counts into kLanes private copies: runs of equal values (the zeros after a ReLU) would otherwise
// serialize on one counter's store-to-load latency. The uint32 copies keep the working set in L1
// and are flushed into int64 totals before they can overflow.
template <bool kAbs>
int64_t Accumulate(const float* data, int64_t n, double lo, double scale, int64_t* bins,
                   int64_t nbins) {
  constexpr int kLanes = 4;
  constexpr int64_t kFlushEvery = int64_t{1} << 31;
  std::vector<uint32_t> lanes(kLanes * nbins, 0);
  std::vector<int64_t> totals(nbins, 0);
  const double last_bin = static_cast<double>(nbins - 1);
  int64_t nonfinite = 0;
  for (int64_t begin = 0; begin < n; begin += kFlushEvery) {
    const int64_t end = std::min(n, begin + kFlushEvery);
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = kAbs ? std::fabs(data[i + l]) : data[i + l];
        nonfinite += NonFinite(v);
        lanes[l * nbins + BinIndex((static_cast<double>(v) - lo) * scale, last_bin)] += 1;
      }
    }
    for (; i < end; ++i) {
      const float v = kAbs ? std::fabs(data[i]) : data[i];
      nonfinite += NonFinite(v);
      lanes[BinIndex((static_cast<double>(v) - lo) * scale, last_bin)] += 1;
    }
    for (int l = 0; l < kLanes; ++l) {
      for (int64_t k = 0; k < nbins; ++k) totals[k] += lanes[l * nbins + k];
    }
    std::fill(lanes.begin(), lanes.end(), 0u);
  }
  if (nonfinite == 0) {
    for (int64_t k = 0; k < nbins; ++k) bins[k] += totals[k];
  }
  return nonfinite;
}

// hist[k] += #{v in x : k == clamp(floor((v - lo) * n / (hi - lo)), 0, n - 1)}, computed in double.
int64_t Histogram(ffi::TensorView x, ffi::TensorView hist, double lo, double hi) {
  CheckTensor(x, "x", kDLFloat, 32);
  CheckVector(hist, "hist", kDLInt, 64);
  if (!(std::isfinite(lo) && std::isfinite(hi) && lo < hi)) {
    TVM_FFI_THROW(ValueError) << "histogram range must be finite with lo < hi";
  }
  const int64_t nbins = hist.size(0);
  const double scale = static_cast<double>(nbins) / (hi - lo);
  return Accumulate<false>(DataPtr<const float>(x), x.numel(), lo, scale, DataPtr<int64_t>(hist),
                           nbins);
}

// Histogram of |x| over [0, max_abs): the same as Histogram(|x|, hist, 0, max_abs).
int64_t AbsHistogram(ffi::TensorView x, ffi::TensorView hist, double max_abs) {
  CheckTensor(x, "x", kDLFloat, 32);
  CheckVector(hist, "hist", kDLInt, 64);
  if (!(std::isfinite(max_abs) && max_abs > 0)) {
    TVM_FFI_THROW(ValueError) << "max_abs must be finite and positive";
  }
  const int64_t nbins = hist.size(0);
  const double scale = static_cast<double>(nbins) / max_abs;
  return Accumulate<true>(DataPtr<const float>(x), x.numel(), 0.0, scale, DataPtr<int64_t>(hist),
                          nbins);
}

// Min/max of one contiguous row, updating *lo / *hi; returns the number of NaN/Inf elements.
// GCC does not vectorize this reduction by itself (it keeps one serial minss chain), so x86 gets
// packed SSE2 min/max over two independent accumulators.
int64_t RowMinMax(const float* row, int64_t len, float* lo, float* hi) {
  int64_t k = 0;
  int64_t nonfinite = 0;
  float mn = *lo, mx = *hi;
#if defined(__SSE2__)
  const __m128i exponent = _mm_set1_epi32(0x7f800000);
  __m128 mn0 = _mm_set1_ps(mn), mn1 = mn0, mx0 = _mm_set1_ps(mx), mx1 = mx0;
  __m128i bad = _mm_setzero_si128();  // lanes count down by one per non-finite element
  for (; k + 8 <= len; k += 8) {
    const __m128 a = _mm_loadu_ps(row + k), b = _mm_loadu_ps(row + k + 4);
    mn0 = _mm_min_ps(mn0, a);
    mn1 = _mm_min_ps(mn1, b);
    mx0 = _mm_max_ps(mx0, a);
    mx1 = _mm_max_ps(mx1, b);
    const __m128i a_exp = _mm_and_si128(_mm_castps_si128(a), exponent);
    const __m128i b_exp = _mm_and_si128(_mm_castps_si128(b), exponent);
    bad = _mm_add_epi32(bad, _mm_cmpeq_epi32(a_exp, exponent));
    bad = _mm_add_epi32(bad, _mm_cmpeq_epi32(b_exp, exponent));
  }
  alignas(16) float lanes_mn[4], lanes_mx[4];
  alignas(16) int32_t lanes_bad[4];
  _mm_store_ps(lanes_mn, _mm_min_ps(mn0, mn1));
  _mm_store_ps(lanes_mx, _mm_max_ps(mx0, mx1));
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes_bad), bad);
  for (int l = 0; l < 4; ++l) {
    mn = std::min(mn, lanes_mn[l]);
    mx = std::max(mx, lanes_mx[l]);
    nonfinite -= lanes_bad[l];
  }
#endif
  for (; k < len; ++k) {
    mn = std::min(mn, row[k]);
    mx = std::max(mx, row[k]);
    nonfinite += NonFinite(row[k]);
  }
  *lo = mn;
  *hi = mx;
  return nonfinite;
}

// Running per-channel range: mins[c] = min(mins[c], min of x along every axis except `axis`).
// Returns the number of NaN/Inf elements (0 means the update was applied).
int64_t ChannelMinMax(ffi::TensorView x, int64_t axis, ffi::TensorView mins,
                      ffi::TensorView maxs) {
  CheckTensor(x, "x", kDLFloat, 32);
  CheckVector(mins, "mins", kDLFloat, 32);
  CheckVector(maxs, "maxs", kDLFloat, 32);
  if (axis < 0) axis += x.ndim();
  if (axis < 0 || axis >= x.ndim()) TVM_FFI_THROW(IndexError) << "axis out of range";
  const int64_t channels = x.size(axis);
  if (mins.size(0) != channels || maxs.size(0) != channels) {
    TVM_FFI_THROW(ValueError) << "mins/maxs must have x.shape[axis] entries";
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  for (int64_t d = axis + 1; d < x.ndim(); ++d) inner *= x.size(d);
  const float* data = DataPtr<const float>(x);
  std::vector<float> lo(DataPtr<float>(mins), DataPtr<float>(mins) + channels);
  std::vector<float> hi(DataPtr<float>(maxs), DataPtr<float>(maxs) + channels);
  int64_t nonfinite = 0;
  if (inner == 1) {
    // Channels are contiguous: update all of them per row, vectorized across channels.
    for (int64_t o = 0; o < outer; ++o) {
      const float* row = data + o * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const float v = row[c];
        lo[c] = v < lo[c] ? v : lo[c];
        hi[c] = v > hi[c] ? v : hi[c];
        nonfinite += NonFinite(v);
      }
    }
  } else {
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t c = 0; c < channels; ++c) {
        nonfinite += RowMinMax(data + (o * channels + c) * inner, inner, &lo[c], &hi[c]);
      }
    }
  }
  if (nonfinite == 0) {
    std::copy(lo.begin(), lo.end(), DataPtr<float>(mins));
    std::copy(hi.begin(), hi.end(), DataPtr<float>(maxs));
  }
  return nonfinite;
}

}  // namespace

}  // namespace tvm_compress

TVM_FFI_DLL_EXPORT_TYPED_FUNC(histogram, tvm_compress::Histogram);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(abs_histogram, tvm_compress::AbsHistogram);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(channel_minmax, tvm_compress::ChannelMinMax);
