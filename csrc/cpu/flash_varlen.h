// flash_varlen.h — one sequence of a variable-length (packed) FlashAttention batch, as the
// CPU forward and backward kernels read it from FlashFwdParams::cu_seqlens_q / _k.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fastattn/params.h"

namespace fastattn {
namespace cpu {

// Sequence i owns query rows [q_start, q_start + seqlen_q) and key rows [k_start, k_start +
// seqlen_k) of the packed tensors. A dense problem is the single "sequence" {0, seqlen_q, 0,
// seqlen_k} of every batch entry (the batch strides place it).
struct VarlenSeq {
  int64_t q_start, seqlen_q, k_start, seqlen_k;
};

// Sequence i of a varlen launch, clamped as params.h requires so that the kernels stay in
// bounds for any cu_seqlens content: rows to [0, total), lengths to >= 0 and to the
// max_seqlen bounds (seqlen_q / seqlen_k). The bindings reject malformed cu_seqlens on the
// CPU before launching, so for valid input this is just the cu_seqlens differences.
inline VarlenSeq varlen_seq(const FlashFwdParams& p, int64_t i) {
  auto range = [](const int32_t* cu, int64_t i, int64_t total, int64_t max_len, int64_t* start, int64_t* len) {
    const int64_t s = std::clamp<int64_t>(cu[i], 0, total);
    const int64_t e = std::clamp<int64_t>(cu[i + 1], s, total);
    *start = s;
    *len = std::min(e - s, std::max<int64_t>(max_len, 0));
  };
  VarlenSeq s;
  range(p.cu_seqlens_q, i, p.total_q, p.seqlen_q, &s.q_start, &s.seqlen_q);
  range(p.cu_seqlens_k, i, p.total_k, p.seqlen_k, &s.k_start, &s.seqlen_k);
  return s;
}

}  // namespace cpu
}  // namespace fastattn
