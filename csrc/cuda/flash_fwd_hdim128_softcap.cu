// flash_fwd_hdim128_softcap.cu — the soft-capped forward kernel for head dim 128 (fp16, bf16;
// the masked kernel only, which also serves unmasked problems). A file of its own so a
// parallel build compiles it beside the uncapped ones instead of lengthening them.
#include "flash_fwd_kernel.cuh"

namespace fastattn {
namespace flash {

cudaError_t run_flash_fwd_hdim128_softcap(const FwdArgs& args, int64_t batch, DType dtype,
                                          cudaStream_t stream) {
  return run_flash_fwd_softcap_dispatch<FwdTraitsHdim128>(args, batch, dtype, stream);
}

}  // namespace flash
}  // namespace fastattn
