// Calibration kernels for tvm-compress, exported through tvm-ffi.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/error.h>

#include <cmath>
#include <cstdint>

namespace tvm_compress {

namespace ffi = tvm::ffi;

// Accumulates |x| of a float32 tensor into `hist` (int64, n bins) over [0, max_abs).
// Values at or beyond max_abs land in the last bin. Returns nothing; `hist` is updated in place.
void AbsHistogram(ffi::TensorView x, ffi::TensorView hist, double max_abs) {
  TVM_FFI_ICHECK(x.dtype().code == kDLFloat && x.dtype().bits == 32) << "x must be float32";
  TVM_FFI_ICHECK(hist.dtype().code == kDLInt && hist.dtype().bits == 64) << "hist must be int64";
  TVM_FFI_ICHECK(max_abs > 0) << "max_abs must be positive";
  const float* data = static_cast<const float*>(x.data_ptr());
  int64_t* bins = static_cast<int64_t*>(hist.data_ptr());
  int64_t n = 1;
  for (int i = 0; i < x.ndim(); ++i) n *= x.size(i);
  const int64_t nbins = hist.size(0);
  const double scale = nbins / max_abs;
  for (int64_t i = 0; i < n; ++i) {
    double v = std::fabs(static_cast<double>(data[i]));
    int64_t b = static_cast<int64_t>(v * scale);
    bins[b < nbins ? b : nbins - 1] += 1;
  }
}

}  // namespace tvm_compress

TVM_FFI_DLL_EXPORT_TYPED_FUNC(abs_histogram, tvm_compress::AbsHistogram);
