// softcap.cuh — logit soft-capping (Gemma 2, Grok) shared by the flash forward, flash
// backward and decode kernels: the score s = softmax_scale * q.k becomes
// softcap * tanh(s / softcap) before masking and softmax (FlashFwdParams::softcap,
// DecodeParams::softcap; 0 = off). Every kernel takes it as a compile-time flag that its
// launcher sets on softcap > 0, so the uncapped instantiations are the same code as before.
//
// How the constants fold. The kernels run the softmax in the log2 domain on x = s * log2(e).
// With a cap they compute t = tanh(s / softcap) from y = q.k * (softmax_scale / softcap *
// 2 log2 e) -- one multiply on the raw mma / FMA accumulator, see softcap_tanh -- and
// x = t * (softcap * log2 e): the multiplier the uncapped path applies to q.k becomes
// softcap * log2 e, with the tanh in between. The backward also needs dcap/ds = 1 - t^2.
//
// Which tanh, and why not tanh.approx.f32. The cheapest choice is the PTX tanh.approx.f32
// (one MUFU op), but its documented maximum relative error is 2^-10.987: an absolute error of
// up to softcap * 2^-11 on a capped logit. Run through the emulator with a stand-in at that
// bound (every tanh off by the full bound, either sign), the forward held flash-attn's
// error-ratio rule, but the backward did not: dK came out ~2.1x the error of an fp16 reference
// on a saturating case (ratio limit 2), and an exact-arithmetic model with the same tanh error
// shows the same, so the instruction itself, not the kernel, breaks fp16 parity. tanhf is ~2
// ulp but a branchy dozen instructions. So: tanh(x) = 1 - 2 / (e^(2x) + 1) from ex2.approx.ftz
// (relative error 2^-22) and rcp.approx.ftz (1 ulp): two MUFU ops, an FADD and an FFMA, with
// an absolute error of a few 2^-24 on t (a capped logit off by ~softcap * 2^-22), and the
// right limits without a branch (e^(2x) = inf -> t = 1; e^(2x) = 0 -> t = -1; NaN stays NaN).
// Near 0 its relative error is poor, but only the absolute error of a logit matters to the
// softmax. The price is one MUFU op more per score than tanh.approx would cost: on the flash
// forward the MUFU pipe (16 ops/clk/SM) already carries one ex2 per score, so the capped
// kernels run up to ~1.5-3x the MUFU work of the uncapped ones; decode is bandwidth bound and
// does not notice. The forward, the backward (which recomputes P from the forward's lse, so
// it must cap exactly as the forward did) and decode all use this one function.
#pragma once

namespace fastattn {

// 2 log2(e): y = 2 x log2 e makes 2^y = e^(2x).
constexpr float kSoftcapTwoLog2e = 2.8853900817779268f;

#if !defined(FASTATTN_FWD_EMULATE) && !defined(FASTATTN_BWD_EMULATE) && !defined(FASTATTN_DECODE_EMULATE)
__device__ __forceinline__ float softcap_ex2(float x) {  // 2^x; 2^-inf = +0, 2^+inf = +inf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float softcap_rcp(float x) {  // 1 / x; 1 / inf = +0
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif  // the emulators (tests/*_emulate.cpp) define both from tests/ptx_emulate.h

// tanh(x) for y = 2 x log2 e (callers fold 2 log2 e into their scale): 1 - 2 / (2^y + 1).
__device__ __forceinline__ float softcap_tanh(float y) {
  return 1.f - 2.f * softcap_rcp(softcap_ex2(y) + 1.f);
}

}  // namespace fastattn
