// Argument checks shared by the calibration kernels. The Python wrappers in tvm_compress/native.py
// validate everything first and raise UserError; these checks only keep a direct caller from
// reading or writing out of bounds.
#ifndef TVM_COMPRESS_CSRC_CHECKS_H_
#define TVM_COMPRESS_CSRC_CHECKS_H_

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include <cstdint>

namespace tvm_compress {

namespace ffi = tvm::ffi;

inline void CheckTensor(const ffi::TensorView& t, const char* name, DLDataTypeCode code,
                        int bits) {
  if (t.device().device_type != kDLCPU) {
    TVM_FFI_THROW(ValueError) << name << " must live in CPU memory";
  }
  if (t.dtype().code != code || t.dtype().bits != bits || t.dtype().lanes != 1) {
    TVM_FFI_THROW(TypeError) << name << " has the wrong dtype (expected "
                             << (code == kDLFloat ? "float" : "int") << bits << ")";
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << name << " must be contiguous";
  }
}

inline void CheckVector(const ffi::TensorView& t, const char* name, DLDataTypeCode code,
                        int bits) {
  CheckTensor(t, name, code, bits);
  if (t.ndim() != 1 || t.size(0) < 1) {
    TVM_FFI_THROW(ValueError) << name << " must be a non-empty 1-D tensor";
  }
}

// DLPack allows a byte offset on top of the data pointer; numpy never sets one, torch may.
template <typename T>
inline T* DataPtr(const ffi::TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

}  // namespace tvm_compress

#endif  // TVM_COMPRESS_CSRC_CHECKS_H_
