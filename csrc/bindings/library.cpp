// library.cpp — the fastattn op schemas (TORCH_LIBRARY) and the Python module init.
//
// Schemas are the contract torch.compile, fake tensors and opcheck see: `Tensor(a!)` marks
// an argument an op mutates; `Tensor?` an optional one. Kernels are registered per device
// in register_cpu.cpp and register_cuda.cpp; fake (meta) impls and autograd live in
// fastattn/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "fastattn/cpu_dispatch.h"

TORCH_LIBRARY(fastattn, m) {
  // ---- rms_norm --------------------------------------------------------------------------
  // y = rms_norm(x) * weight; rstd (x.shape[:-1]) fp32 is saved for the backward.
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  // h = x + residual; y = rms_norm(h) * weight, in one pass.
  m.def("rms_norm_add_fwd(Tensor x, Tensor residual, Tensor? weight, float eps)"
        " -> (Tensor y, Tensor h, Tensor rstd)");
  // dx (incl. dh, the gradient into h) and dweight (fp32; shape (0,) when weight is None).
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dh)"
        " -> (Tensor dx, Tensor dweight)");

  // ---- rotary ----------------------------------------------------------------------------
  // q (B, S, H, D), k (B, S, Hk, D) rotated by the angles of cos/sin (max_pos, R/2) fp32 at
  // positions ((B, S) or (S,) int32/int64; None = arange(S)). conjugate rotates by the
  // negated angle (the backward). Out of place: contiguous outputs. In place: q and k.
  // check_positions=False skips the position-range check on CUDA (a host sync); the CPU
  // always checks. Unchecked, a bad position gives NaN in its token's rotated dims.
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved,"
        " bool conjugate, bool check_positions=True) -> (Tensor q_out, Tensor k_out)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions,"
        " bool interleaved, bool conjugate, bool check_positions=True) -> ()");

  // ---- flash attention -------------------------------------------------------------------
  // q (B, Sq, H, D), k/v (B, Sk, Hk, D), last dim contiguous. out (B, Sq, H, D) in q's dtype,
  // lse (B, H, Sq) fp32 (kept for the backward). Keys visible to query i: the band
  // [i + Sk - Sq - window_left, i + Sk - Sq + window_right], -1 = unbounded; causal = (-1, 0).
  // softcap > 0 (here and on every attention op below): the scores s = softmax_scale * q.k
  // become softcap * tanh(s / softcap) before masking and softmax (Gemma 2); 0 = off.
  // (SymInt windows, here and on the varlen and kvcache ops: SDPA's top-left is_causal
  // passes right = Sq - Sk, and a window may be derived from a shape, which under
  // torch.compile(dynamic=True) / torch.export must stay symbolic, not specialise the graph)
  // allow_short_query: up to 16 queries over at least 4x as many keys may run on the KV-cache
  // kernels (faster there); False always runs the tiled forward, the kernel whose scores
  // flash_attn_bwd recomputes (fastattn.ops passes False when the call will be differentiated:
  // an lse from the other kernel's scores, rounded differently, left the fp32 gradients of a
  // sharp softmax up to ~10x less accurate; outside audit).
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, SymInt window_left,"
        " SymInt window_right, float softcap=0.0, bool allow_short_query=True) -> (Tensor out, Tensor lse)");
  // Backward of flash_attn_fwd (recompute from out and lse): dq, dk, dv with q/k/v's shapes
  // and dtype. deterministic: bitwise reproducible gradients (both kernels always are).
  m.def("flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float softmax_scale, SymInt window_left, SymInt window_right, bool deterministic, float softcap=0.0)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");

  // Variable-length (packed) form: q (total_q, H, D), k/v (total_k, Hk, D); sequence i owns
  // rows [cu_seqlens_q[i], cu_seqlens_q[i+1]) of q and [cu_seqlens_k[i], cu_seqlens_k[i+1])
  // of k/v (cu_seqlens (B + 1) int32 on the device) and is masked as flash_attn_fwd masks
  // it alone. max_seqlen_q/_k bound the lengths (launch sizing only; never a host read of
  // cu_seqlens on CUDA). out (total_q, H, D), lse (H, total_q) fp32.
  m.def("flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, SymInt window_left,"
        " SymInt window_right, float softcap=0.0) -> (Tensor out, Tensor lse)");
  m.def("flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale,"
        " SymInt window_left, SymInt window_right, bool deterministic, float softcap=0.0)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");

  // ---- decode attention and append_kv ----------------------------------------------------
  // One query token per sequence against a KV cache with ragged lengths: out has q's shape,
  // lse (B, H) fp32. num_splits = 0 picks split-KV: on CUDA from the shapes only (graph-safe),
  // on the CPU from the batch and the longest of cache_seqlens; never from the thread count.
  // block_table (B, max_pages) int32: the caches are page pools (num_pages, page_size, Hk, D)
  // and token t of sequence b is pool[block_table[b, t // page_size], t % page_size].
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
        " float? softmax_scale, int num_splits, Tensor? block_table=None, float softcap=0.0)"
        " -> (Tensor out, Tensor lse)");
  // q (B, Sq, H, D) over the cache rows [0, cache_seqlens[b] + seqlens_k_add) (contiguous or
  // paged as above), bottom-right aligned, keys limited by the window (-1 = unbounded;
  // causal = right 0). out (B, Sq, H, D), lse (B, H, Sq) fp32.
  m.def("attention_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
        " Tensor? block_table, float? softmax_scale, SymInt window_left, SymInt window_right, SymInt seqlens_k_add,"
        " int num_splits, float softcap=0.0) -> (Tensor out, Tensor lse)");
  // Writes k, v (B, Sn, Hk, D) into the caches at rows cache_seqlens[b] + i, in place.
  // check_capacity=False skips the capacity check on CUDA (a host read of cache_seqlens);
  // the CPU always checks. Unchecked, rows outside the cache are dropped on the device.
  m.def("append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens,"
        " Tensor? block_table=None, bool check_capacity=True) -> ()");

  // ---- mixture-of-experts experts (CPU kernel only) --------------------------------------
  // out (N, hidden) fp32 = sum_j routing_weights[:, j] * expert_{expert_ids[:, j]}(x) for
  // x (N, hidden), routing_weights (N, k) fp32, expert_ids (N, k) int64 in [0, E), w13
  // (E, 2 * inter, hidden) (gate rows, then up rows), w2 (E, hidden, inter); expert_e(x) =
  // W2_e (silu(x G_e^T) * (x U_e^T)) with the activation stored in x's dtype, fp32 sums.
  m.def("moe_experts(Tensor x, Tensor routing_weights, Tensor expert_ids, Tensor w13, Tensor w2) -> Tensor");
}

// A minimal Python module so `import fastattn._C` loads the library (and with it the
// registrations above); ops are reached through torch.ops.fastattn.
// _C.cpu_isa() -> str: the instruction-set tier of the CPU kernels in use (first call picks it).
static PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastattn::cpu_isa()); }

static PyMethodDef module_methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU kernels' instruction-set tier: baseline, avx2, avx512 (native/custom in a single-tier build)."},
    {nullptr, nullptr, 0, nullptr},
};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef FASTATTN_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#ifdef FASTATTN_CUDA_ARCHS
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", FASTATTN_CUDA_ARCHS);
#else
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", "");
#endif
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", "");
#endif
  return mod;
}
