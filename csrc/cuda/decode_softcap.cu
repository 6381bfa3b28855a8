// decode_softcap.cu — the soft-capped decode kernels (DecodeParams::softcap > 0; see
// softcap.cuh and decode.cu), dtype x head dim, reached from decode_attention_cuda after its
// checks. A file of its own so a parallel build compiles it beside decode.cu.
#include <cuda_runtime.h>

#include "decode_kernels.cuh"
#include "decode_launch.cuh"
#include "fastattn/params.h"

namespace fastattn {
namespace decode_kernels {

namespace {
template <int kD>
cudaError_t dispatch_dtype_softcap(const DecodeParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_decode<__half, kD, true>(p, stream);
    case DType::kBFloat16: return launch_decode<__nv_bfloat16, kD, true>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace

cudaError_t decode_attention_softcap_cuda(const DecodeParams& p, cudaStream_t stream) {
  switch (p.d) {
    case 64: return dispatch_dtype_softcap<64>(p, stream);
    case 128: return dispatch_dtype_softcap<128>(p, stream);
    case 256: return dispatch_dtype_softcap<256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode_kernels
}  // namespace fastattn
