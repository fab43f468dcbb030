// MSE calibration: the clipping threshold minimizing the expected squared error of symmetric
// quantization, estimated from a histogram of |x| (conventions in search_common.h).
#include <tvm/ffi/function.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "search_common.h"

namespace tvm_compress {

namespace {

// Adding and subtracting 2^52 rounds a double in [0, 2^52) to an integer, half to even (the
// default rounding mode), exactly like np.rint, but without a libm call: the loop vectorizes.
constexpr double kRoundMagic = 4503599627370496.0;

// Mean squared error with `levels` steps on each side of zero, clipping at i * width, every count
// placed at its bin center. `centers` and `counts` (as double) are padded with zero counts to a
// multiple of 4; the four partial sums let the compiler use packed SSE2 arithmetic.
double MseForCandidate(const std::vector<double>& centers, const std::vector<double>& counts,
                       int64_t i, double width, int64_t levels, double total) {
  const double step = static_cast<double>(i) * width / static_cast<double>(levels);
  const double inv_step = static_cast<double>(levels) / (static_cast<double>(i) * width);
  const double top = static_cast<double>(levels);
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (size_t k = 0; k < centers.size(); k += 4) {
    for (int l = 0; l < 4; ++l) {
      const double center = centers[k + l];
      double level = (center * inv_step + kRoundMagic) - kRoundMagic;  // < n * levels << 2^52
      level = level > top ? top : level;
      const double err = level * step - center;
      acc[l] += counts[k + l] * err * err;
    }
  }
  return (acc[0] + acc[1] + acc[2] + acc[3]) / total;
}

SearchResult MseThreshold(ffi::TensorView hist, double max_abs, int64_t num_levels,
                          int64_t start_bin, int64_t stride) {
  CheckVector(hist, "hist", kDLInt, 64);
  if (!(std::isfinite(max_abs) && max_abs > 0)) {
    TVM_FFI_THROW(ValueError) << "max_abs must be finite and positive";
  }
  if (num_levels < 1) TVM_FFI_THROW(ValueError) << "num_levels must be >= 1";
  const int64_t n = hist.size(0);
  const int64_t* hist_data = DataPtr<const int64_t>(hist);
  const double width = max_abs / static_cast<double>(n);
  const size_t padded = static_cast<size_t>((n + 3) / 4 * 4);
  std::vector<double> centers(padded, 0.0), counts(padded, 0.0);
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) {
    centers[k] = (static_cast<double>(k) + 0.5) * width;
    counts[k] = static_cast<double>(hist_data[k]);
    count += hist_data[k];
  }
  if (count <= 0) TVM_FFI_THROW(ValueError) << "hist is empty";
  const std::vector<int64_t> bins = Candidates(n, start_bin, stride);
  std::vector<double> scores(bins.size());
  for (size_t c = 0; c < bins.size(); ++c) {
    scores[c] =
        MseForCandidate(centers, counts, bins[c], width, num_levels, static_cast<double>(count));
  }
  return PickBest(bins, scores);
}

}  // namespace

}  // namespace tvm_compress

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mse_threshold, tvm_compress::MseThreshold);
