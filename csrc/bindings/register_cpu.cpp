// register_cpu.cpp — CPU kernels for every fastattn op (one section per op).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  // ---- rms_norm --------------------------------------------------------------------------
  m.impl("rms_norm_fwd", &fastattn::rms_norm_fwd);
  m.impl("rms_norm_add_fwd", &fastattn::rms_norm_add_fwd);
  m.impl("rms_norm_bwd", &fastattn::rms_norm_bwd);

  // ---- rotary ----------------------------------------------------------------------------
  m.impl("rotary", &fastattn::rotary);
  m.impl("rotary_", &fastattn::rotary_);

  // ---- flash attention -------------------------------------------------------------------
  m.impl("flash_attn_fwd", &fastattn::flash_attn_fwd);
  m.impl("flash_attn_bwd", &fastattn::flash_attn_bwd);
  m.impl("flash_attn_varlen_fwd", &fastattn::flash_attn_varlen_fwd);
  m.impl("flash_attn_varlen_bwd", &fastattn::flash_attn_varlen_bwd);

  // ---- decode attention and append_kv ----------------------------------------------------
  m.impl("decode_attention", &fastattn::decode_attention);
  m.impl("attention_with_kvcache", &fastattn::attention_with_kvcache);
  m.impl("append_kv", &fastattn::append_kv);

  // ---- mixture-of-experts experts (CPU only) ----------------------------------------------
  m.impl("moe_experts", &fastattn::moe_experts);
}
