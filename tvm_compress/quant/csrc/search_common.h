// Shared by the clipping-threshold searches over a histogram of |x| (n bins of width max_abs / n).
// A candidate i keeps bins [0, i), i.e. clips at the upper edge of bin i - 1:
// threshold = i * max_abs / n. Candidates are i = n, n - stride, n - 2 * stride, ... down to
// start_bin, so "no clipping" (i = n) is always one of them. The NumPy twins in
// tvm_compress/entropy.py define the same numbers.
#ifndef TVM_COMPRESS_CSRC_SEARCH_COMMON_H_
#define TVM_COMPRESS_CSRC_SEARCH_COMMON_H_

#include <tvm/ffi/container/tuple.h>
#include <tvm/ffi/error.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tvm_compress {

// The smallest candidate whose score is within kTieRelTol * |best| + kTieAbsTol of the best wins:
// scores are float sums whose last bits depend on summation order, and the tolerance makes the
// native and NumPy versions pick the same index on exact mathematical ties.
constexpr double kTieRelTol = 1e-9;
constexpr double kTieAbsTol = 1e-12;
constexpr double kInf = std::numeric_limits<double>::infinity();

using SearchResult = tvm::ffi::Tuple<int64_t, double>;

inline std::vector<int64_t> Candidates(int64_t n, int64_t start_bin, int64_t stride) {
  if (stride < 1) TVM_FFI_THROW(ValueError) << "stride must be >= 1";
  if (start_bin < 1 || start_bin > n) TVM_FFI_THROW(ValueError) << "start_bin must be in [1, n]";
  std::vector<int64_t> out;
  for (int64_t i = n; i >= start_bin; i -= stride) out.push_back(i);
  std::reverse(out.begin(), out.end());
  return out;
}

inline double BestScore(const std::vector<double>& scores) {
  double best = kInf;
  for (double s : scores) best = std::min(best, s);
  return best;
}

// (-1, inf) when no candidate has a finite score.
inline SearchResult PickBest(const std::vector<int64_t>& bins, const std::vector<double>& scores) {
  const double best = BestScore(scores);
  if (!std::isfinite(best)) return SearchResult(int64_t{-1}, kInf);
  const double bound = best + kTieRelTol * std::fabs(best) + kTieAbsTol;
  for (size_t c = 0; c < bins.size(); ++c) {
    if (scores[c] <= bound) return SearchResult(bins[c], scores[c]);
  }
  return SearchResult(int64_t{-1}, kInf);  // unreachable: best itself is within the bound
}

}  // namespace tvm_compress

#endif  // TVM_COMPRESS_CSRC_SEARCH_COMMON_H_
