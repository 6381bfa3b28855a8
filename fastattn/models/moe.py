"""Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE): torch, and a CPU kernel for the experts.

    moe = MoEFeedForward(hidden_size=1024, intermediate_size=3584, num_experts=8, top_k=2)
    y = moe(x)                                     # x (..., hidden) -> (..., hidden)

Per token x (one row of the flattened input):
  router      p = softmax(x W_router^T)  (logits in x's dtype, softmax in fp32, E experts)
  top-k       the k largest p_e (torch.topk: ties go as topk breaks them) with their ids
  renormalise w = p_topk / sum(p_topk) when ``norm_topk_prob`` (Mixtral always; Qwen2-MoE
              and Qwen3-MoE as their config says), else w = p_topk
  experts     y = sum_j w_j * expert_{e_j}(x), expert_e(x) = W2_e (silu(x G_e^T) * (x U_e^T))
  shared      + sigmoid(x g^T) * shared_mlp(x)   when a shared expert is configured (Qwen2-MoE)

Expert weights are stored fused: ``w13`` (E, 2 * inter, hidden) holds each expert's gate rows
then its up rows (Hugging Face's ``gate_up_proj`` layout), ``w2`` (E, hidden, inter).

No Python loop over tokens: the flattened (token, slot) pairs are sorted by expert id (a stable
argsort), so each expert's tokens are one contiguous slice of the gathered input; each expert
with tokens runs one gate/up matmul and one down matmul on its slice (the only loop is over the
E experts, skipping those no token picked), the results go back to their (token, slot) places
with one gather (the inverse permutation), and a (1 x k) @ (k x hidden) batched matmul per
token combines them with the routing weights. The combine and the accumulation are fp32; the
output has x's dtype. Without autograd (inference) each expert's temporaries are sized to its
tokens (cache-resident), silu(gate) * up is formed in place and the down matmul writes straight
into the expert's rows of one output buffer.

The experts kernel: the fastattn backend (the module's default) runs CPU inference with few
tokens per expert (decode steps, short prompts) through ``torch.ops.fastattn.moe_experts``
instead (``uses_kernel``; csrc/cpu/moe.cpp). It groups the slots by expert itself, streams each
selected expert's weights from memory once for all of its tokens (register-blocked fp32 FMAs,
16-bit weights widened in registers; bf16 on AVX512-BF16 CPUs through vdpbf16ps), forms silu(gate) * up as the gate/up dots come out and
adds the weighted down projection into the fp32 output. Same numbers as the torch experts up to
fp32 summation order; in bf16/fp16 its gate/up and expert outputs stay fp32 and only the
activation is rounded to the model's dtype (as on the upcast path below, where the native
matmuls of few-token experts round gate/up and the output too). The torch backend always runs
the torch experts.

Low precision on the CPU: CPUs without bf16/fp16 matrix instructions run torch's bf16/fp16
matmuls several times slower than fp32 ones; ``NATIVE_CPU_MATMUL`` says, per dtype, whether
this CPU has them. Where it does, every expert uses the native matmul. Where it does not, an
expert with at least ``UPCAST_MIN_ROWS`` tokens (prefill) widens its weights and its tokens to
fp32 once and multiplies in fp32 (the products are exact in fp32 and the sums accumulate in
fp32, as a bf16 matmul's do); experts with few tokens (decode) use the native matmul, where
widening the weights would cost more than the matmul. Either way the activation
silu(gate) * up is stored in the model's dtype, as in the dense MLP. On CUDA the native matmul
is always used.

The host learns the per-expert token counts once per call (one device sync on CUDA), so a decode
step of an MoE model is not CUDA-graph capturable. Under torch.compile / torch.export (where no
host read is allowed) CPU inference on the fastattn backend (autograd off: torch.no_grad /
inference_mode, or weights that do not require grad; x in the weights' dtype) takes the kernel at
any token count, and everything else (autograd, CUDA, the torch backend, mixed dtypes) runs
``experts_traced``: every expert on every token, weighted by the routing (0 where not picked),
E / k times the expert FLOPs and every expert's weights read per call, so fullgraph compiles and
exports of MoE models work, at that cost. (Traced, 16-bit experts on CPUs without native
matmuls for the dtype are always widened to fp32, as eager widens prefill-sized ones.)

Router fields that do not change inference are not represented: router jitter noise
(``router_jitter_noise``, training only) and the load-balancing loss (``router_aux_loss_coef``,
``output_router_logits``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.benchmarks.meta import all_cpu_flags  # stdlib only: the /proc/cpuinfo reader

__all__ = ["MoEFeedForward", "UPCAST_MIN_ROWS", "NATIVE_CPU_MATMUL", "KERNEL_MAX_ROWS_PER_EXPERT"]

# CPU, bf16/fp16: an expert with at least this many tokens multiplies in fp32 (see the module
# docstring). Widening one expert's weights (Mixtral-like, hidden 1024 x inter 3584) cost about
# as much as 30-40 rows of a bf16 matmul on the 2-core AVX2 machine this was measured on.
UPCAST_MIN_ROWS = 32

# Whether torch's CPU matmuls in that dtype run on matrix instructions of this CPU (AVX512-BF16
# or AMX-BF16 for bf16; AVX512-FP16 or AMX-FP16 for fp16). There the native matmul is faster
# than fp32 (measured on a 2-core AVX512-BF16 machine, Mixtral-like prefill: bf16 343 GFLOP/s,
# fp32 108) and no expert is widened; elsewhere torch emulates them, several times slower than
# fp32, and experts of UPCAST_MIN_ROWS tokens or more multiply in fp32.
_FLAGS = all_cpu_flags() or frozenset()
NATIVE_CPU_MATMUL = {
    torch.bfloat16: bool(_FLAGS & {"avx512_bf16", "amx_bf16"}),
    torch.float16: bool(_FLAGS & {"avx512_fp16", "amx_fp16"}),
}

# CPU inference on the fastattn backend: the experts kernel runs calls with at most this many
# (token, choice) slots per expert on average (N * top_k <= this * num_experts); above it the
# per-expert torch matmuls are faster (see ``MoEFeedForward.uses_kernel``).
KERNEL_MAX_ROWS_PER_EXPERT = 16


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the experts' outputs are summed in: fp32, or fp64 for an fp64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _transform_active() -> bool:
    from fastattn.ops import transform_active  # (imported on use, as the extension in _kernel_available)

    return transform_active()


def _kernel_available() -> bool:
    """Whether the loaded fastattn extension has the moe_experts op (a build from before it
    does not; the torch path then runs)."""
    global _KERNEL
    if _KERNEL is None:
        try:
            import fastattn.ops  # noqa: F401  (loads the extension and the op's fake impl)
            _KERNEL = hasattr(torch.ops.fastattn, "moe_experts")
        except (ImportError, RuntimeError):
            _KERNEL = False
    return _KERNEL


_KERNEL = None


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts, with an optional sigmoid-gated shared expert.

    ``router_weights_in_input_dtype``: Qwen2-MoE / Qwen3-MoE round the top-k routing weights to
    the activations' dtype before combining; Mixtral keeps them fp32 (no difference in fp32).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool = True, shared_expert_intermediate_size: int = 0,
                 router_weights_in_input_dtype: bool = False):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must lie in [1, num_experts ({num_experts})]")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = bool(norm_topk_prob)
        self.router_weights_in_input_dtype = bool(router_weights_in_input_dtype)
        self.shared_intermediate_size = int(shared_expert_intermediate_size or 0)
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if self.shared_intermediate_size:
            self.shared_w13 = nn.Linear(hidden_size, 2 * self.shared_intermediate_size, bias=False)
            self.shared_w2 = nn.Linear(self.shared_intermediate_size, hidden_size, bias=False)
            self.shared_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_w13 = self.shared_w2 = self.shared_gate = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """normal(0, std) for every weight, as transformers initialises its experts."""
        for p in self.parameters():
            nn.init.normal_(p, std=std)

    def extra_repr(self) -> str:
        s = (f"hidden={self.hidden_size}, inter={self.intermediate_size}, experts={self.num_experts}, "
             f"top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}")
        if self.shared_intermediate_size:
            s += f", shared_inter={self.shared_intermediate_size}"
        return s

    # -- routing ------------------------------------------------------------------------
    def route(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x (N, hidden) -> (weights (N, k) fp32, expert ids (N, k) int64)."""
        logits = F.linear(x, self.router.weight)  # (N, E), x's dtype
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.router_weights_in_input_dtype:
            weights = weights.to(x.dtype).float()
        return weights, ids

    # -- experts ------------------------------------------------------------------------
    def _swiglu(self, x: Tensor, w13: Tensor, w2: Tensor, inter: int) -> Tensor:
        """w2 (silu(x G^T) * (x U^T)) for one expert's rows x (n, hidden); w13 (2*inter, hidden)
        and w2 (hidden, inter). Returns fp32 when it multiplied in fp32, else x's dtype."""
        dtype = x.dtype
        # (traced: widened whatever the row count, as a shape test would be a guard that an
        # export with a dynamic token count fails on the other side of; the traced experts run
        # under autograd or on every token, prefill-sized products, where widening wins)
        if (dtype in _HALF_DTYPES and x.device.type == "cpu" and not NATIVE_CPU_MATMUL.get(dtype, False)
                and (torch.compiler.is_compiling() or x.shape[0] >= UPCAST_MIN_ROWS)):
            gate, up = F.linear(x.float(), w13.float()).split(inter, dim=-1)
            act = (F.silu(gate) * up).to(dtype)
            return F.linear(act.float(), w2.float())
        gate, up = F.linear(x, w13).split(inter, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """sum_j weights[:, j] * expert_{ids[:, j]}(x) for x (N, hidden): (N, hidden) fp32 (fp64
        for an fp64 x)."""
        N, k = ids.shape
        acc = _acc_dtype(x.dtype)
        flat = ids.reshape(-1)  # (N*k,) slot s = token s // k, choice s % k
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, token order kept
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
        xs = x.index_select(0, order // k)  # (N*k, hidden): each slot's token, expert-major
        spans = []  # (expert, first slot, end slot) of each expert with tokens
        start = 0
        for e, n in enumerate(counts):
            if n:
                spans.append((e, start, start + n))
                start += n
        if self._differentiated(x):
            ys = torch.cat([self._swiglu(xs[s:t], self.w13[e], self.w2[e], self.intermediate_size).to(acc)
                            for e, s, t in spans])  # (N*k, hidden) fp32 (fp64), expert-major
        else:
            ys = self._experts_no_grad(xs, spans)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)  # the inverse permutation
        slots = ys.index_select(0, back).view(N, k, self.hidden_size)  # (token, choice) order
        return torch.bmm(weights.view(N, 1, k).to(acc), slots).view(N, self.hidden_size)

    def experts_traced(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """``experts`` for torch.compile / torch.export: the same sum without reading the
        routing on the host (``experts`` groups the slots by expert with one host read of the
        per-expert counts, which a fullgraph trace or an export cannot do). Every expert runs
        on every token row, the rows of tokens that did not pick it zeroed first (so with finite
        weights it gives exactly 0 there, and an overflow of an unpicked expert does not reach
        the output), and each token's result is weighted by the routing weight
        it gave that expert: static shapes, but E / k times the expert FLOPs of the grouped path
        and every expert's weights read on every call (a batch-1 decode step with 64 experts,
        top 4, measured ~10x slower than grouped on the CPU). (N, hidden) fp32 (fp64 for fp64)."""
        acc = _acc_dtype(x.dtype)
        N = x.shape[0]
        picked = torch.zeros(N, self.num_experts, dtype=torch.bool, device=x.device)
        picked = picked.scatter(1, ids, True)  # (N, E)
        per_expert = torch.zeros(N, self.num_experts, dtype=acc, device=x.device)
        per_expert = per_expert.scatter_add(1, ids, weights.to(acc))  # (N, E) routing weights
        out = torch.zeros(N, self.hidden_size, dtype=acc, device=x.device)
        for e in range(self.num_experts):
            rows = torch.where(picked[:, e:e + 1], x, 0)  # silu(0) * 0 = 0: the expert gives 0 there
            y = self._swiglu(rows, self.w13[e], self.w2[e], self.intermediate_size).to(acc)
            out = out + per_expert[:, e:e + 1] * y
        return out

    def _experts_no_grad(self, xs: Tensor, spans) -> Tensor:
        """The experts on the expert-major slots xs (M, hidden) without autograd, one expert at
        a time with cache-sized temporaries: its (n, 2 * inter) gate/up product goes into one
        buffer sized for the largest expert, silu(gate) * up is formed there in place, and the
        down matmul writes the expert's rows of the output. Buffers spanning all slots would
        be several times the last-level cache (a Mixtral-like prefill: 29 MB for gate/up
        alone), be written to and re-read from memory and, being fresh large allocations,
        page-fault on first touch on every call (measured: ~5400 minor faults per fp32
        prefill call before, ~1200 now). Same numbers as ``_swiglu`` per expert, except that
        on the CPU in bf16/fp16 the activation is computed in fp32 from the (rounded) gate/up
        of the native matmul and then rounded. Returns (M, hidden) fp32."""
        I, dtype = self.intermediate_size, xs.dtype
        # fp32 math for big experts, where this CPU has no matrix instructions for the dtype
        wide = dtype in _HALF_DTYPES and xs.device.type == "cpu" and not NATIVE_CPU_MATMUL.get(dtype, False)
        ys = xs.new_empty(xs.shape[0], self.hidden_size, dtype=torch.float32 if wide else dtype)
        # One gate/up buffer for the largest expert, reused by every expert (one allocation and
        # one first touch per call instead of one per expert).
        hbuf = None if wide else xs.new_empty(max(t - s for _, s, t in spans), 2 * I)
        for e, s, t in spans:
            upcast = wide and t - s >= UPCAST_MIN_ROWS
            if not wide:
                h = torch.mm(xs[s:t], self.w13[e].t(), out=hbuf[:t - s])
            elif upcast:
                h = torch.mm(xs[s:t].float(), self.w13[e].float().t())
            else:
                h = torch.mm(xs[s:t], self.w13[e].t()).float()  # native low-precision matmul
            gate, up = h.split(I, dim=-1)
            act = F.silu(gate, inplace=True).mul_(up)  # (n, inter), a view into h
            if wide:
                act = act.to(dtype)  # the activation is stored in the model's dtype
            if upcast:
                torch.mm(act.float(), self.w2[e].float().t(), out=ys[s:t])
            elif wide:
                ys[s:t] = torch.mm(act, self.w2[e].t())
            else:
                torch.mm(act, self.w2[e].t(), out=ys[s:t])
        return ys.to(_acc_dtype(dtype))

    def shared_expert(self, x: Tensor) -> Tensor:
        """sigmoid(x g^T) * shared_mlp(x), x (N, hidden) -> (N, hidden) fp32 (fp64 for fp64)."""
        y = self._swiglu(x, self.shared_w13.weight, self.shared_w2.weight, self.shared_intermediate_size)
        gate = torch.sigmoid(F.linear(x, self.shared_gate.weight))  # (N, 1), x's dtype
        acc = _acc_dtype(x.dtype)
        return gate.to(acc) * y.to(acc)

    def uses_kernel(self, x: Tensor, backend: str = "fastattn") -> bool:
        """Whether ``forward`` runs the routed experts with the ``fastattn.moe_experts`` CPU
        kernel for the (N, hidden) input x: the fastattn backend, the CPU, no autograd, x in the
        weights' dtype, and few token rows per expert (at most ``KERNEL_MAX_ROWS_PER_EXPERT`` on
        average: decode steps and short prompts, where the experts are bound by reading the
        weights; longer inputs are matrix-matrix products, which torch's GEMM does best).
        Traced (torch.compile / torch.export): any row count, the kernel being the only traced
        path that runs just the experts each token picked (see ``experts_traced``)."""
        return (backend == "fastattn" and x.device.type == "cpu" and x.dtype == self.w13.dtype
                and x.dtype == self.w2.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not self._differentiated(x)
                # (traced: the kernel at any row count, as a shape test would be a guard that an
                # export with a dynamic batch fails on the other side of; experts_traced instead
                # would run every expert on every token)
                and (torch.compiler.is_compiling() or x.shape[0] * self.top_k <= KERNEL_MAX_ROWS_PER_EXPERT * self.num_experts)
                and _kernel_available())

    def _differentiated(self, x: Tensor) -> bool:
        """Whether autograd records this call (x, the experts' or the router's weights need
        gradients: the router alone in router-only fine-tuning) or a torch.func transform or
        forward-mode AD level is active: then neither the kernel (no derivative) nor the
        no-grad experts (out= matmuls) may run."""
        return (torch.is_grad_enabled() and (x.requires_grad or self.w13.requires_grad or self.w2.requires_grad
                                             or self.router.weight.requires_grad)) or _transform_active()

    def forward(self, x: Tensor, backend: str = "fastattn") -> Tensor:
        """x (..., hidden) -> (..., hidden) in x's dtype. ``backend`` (the model's): "fastattn"
        lets CPU inference use the experts kernel (see ``uses_kernel``), "torch" always runs
        the plain-torch experts."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            # (the reshape below would fold any size divisible by hidden_size into rows: a wrong
            # answer, not an error)
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (..., hidden_size) = (..., {self.hidden_size}), got {got}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if x2.shape[0] == 0:
            return torch.zeros_like(x)
        weights, ids = self.route(x2)
        if self.uses_kernel(x2, backend):
            # The kernel takes rows with a contiguous last dim; x may be any view (the torch
            # experts take it as it is).
            out = torch.ops.fastattn.moe_experts(x2.contiguous(), weights, ids, self.w13, self.w2)
        elif torch.compiler.is_compiling():
            out = self.experts_traced(x2, weights, ids)
        else:
            out = self.experts(x2, weights, ids)
        if self.shared_intermediate_size:
            out = out + self.shared_expert(x2)
        return out.to(x.dtype).view(shape)
