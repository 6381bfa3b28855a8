// register_cuda.cpp — CUDA kernels for every fastattn op (one section per op). Compiled only
// when the extension is built with CUDA (setup.py adds it with -DFASTATTN_WITH_CUDA).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  // ---- rms_norm --------------------------------------------------------------------------
  m.impl("rms_norm_fwd", &fastattn::rms_norm_fwd);
  m.impl("rms_norm_add_fwd", &fastattn::rms_norm_add_fwd);
  m.impl("rms_norm_bwd", &fastattn::rms_norm_bwd);

  // ---- rotary ----------------------------------------------------------------------------

  // ---- flash attention -------------------------------------------------------------------
  m.impl("flash_attn_fwd", &fastattn::flash_attn_fwd);
  m.impl("flash_attn_bwd", &fastattn::flash_attn_bwd);

  // ---- decode attention and append_kv ----------------------------------------------------
}
