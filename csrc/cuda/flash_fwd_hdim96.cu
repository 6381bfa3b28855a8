// flash_fwd_hdim96.cu — the forward kernel for head dim 96 (fp16, bf16): the masked kernel only
// (with no window its band test is the key-tail test, so it also serves unmasked problems) and
// its soft-capped twin, 4 kernels. One file per head dim so a parallel build compiles them side
// by side. Tile choice (FwdTraitsHdim96): see the tuning notes in flash_fwd.cu.
#include "flash_fwd_kernel.cuh"

namespace fastattn {
namespace flash {

cudaError_t run_flash_fwd_hdim96(const FwdArgs& args, int64_t batch, DType dtype, bool softcap,
                                 cudaStream_t stream) {
  return run_flash_fwd_masked_dispatch<FwdTraitsHdim96>(args, batch, dtype, softcap, stream);
}

}  // namespace flash
}  // namespace fastattn
