// flash_fwd_hdim128.cu — instantiations of the forward kernel for head dim 128 (fp16, bf16) x
// (masked, unmasked). One file per head dim so a parallel build compiles them side by side.
// Tile choice: see the tuning notes in flash_fwd.cu.
#include "flash_fwd_kernel.cuh"

namespace fastattn {
namespace flash {

cudaError_t run_flash_fwd_hdim128(const FwdArgs& args, int64_t batch, DType dtype, bool masked,
                                  cudaStream_t stream) {
  return run_flash_fwd_dispatch<FwdTraitsHdim128>(args, batch, dtype, masked, stream);
}

}  // namespace flash
}  // namespace fastattn
