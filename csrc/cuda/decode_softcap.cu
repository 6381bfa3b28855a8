// decode_softcap.cu — the soft-capped decode kernels (DecodeParams::softcap > 0; see
// softcap.cuh and decode.cu), dtype x head dim, reached from decode_attention_cuda after its
// checks. A file of its own so a parallel build compiles it beside decode.cu (both launch
// through decode_launch.cuh; tests/decode_emulate.cpp compiles both files).
#include <cuda_runtime.h>

#include "decode_kernels.cuh"
#include "decode_launch.cuh"
#include "fastattn/params.h"

namespace fastattn {
namespace decode_kernels {

cudaError_t decode_attention_softcap_cuda(const DecodeParams& p, cudaStream_t stream) {
  return dispatch_decode<true>(p, stream);
}

}  // namespace decode_kernels
}  // namespace fastattn
