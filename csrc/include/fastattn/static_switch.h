// static_switch.h — turn runtime values into compile-time template arguments, in one place
// per op, over a closed list. Anything outside the list is an error the caller reports;
// nothing silently falls through to a wrong instantiation.
//
//   BOOL_SWITCH(params.is_causal, kIsCausal, [&] { launch<kIsCausal>(params, stream); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                    \
    if (COND) {                            \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                \
    }                                      \
  }()

// Dispatch over fastattn::DType to an element type. ELEM_T is bound to float,
// FP16_TYPE or BF16_TYPE, which the including file chooses (c10::Half / __half ...), so
// this header stays free of torch and CUDA.
#define FASTATTN_DTYPE_SWITCH(DTYPE, ELEM_T, FP16_TYPE, BF16_TYPE, ...) \
  [&] {                                                                 \
    switch (DTYPE) {                                                    \
      case ::fastattn::DType::kFloat16: {                               \
        using ELEM_T = FP16_TYPE;                                       \
        return __VA_ARGS__();                                           \
      }                                                                 \
      case ::fastattn::DType::kBFloat16: {                              \
        using ELEM_T = BF16_TYPE;                                       \
        return __VA_ARGS__();                                           \
      }                                                                 \
      case ::fastattn::DType::kFloat32:                                 \
      default: {                                                        \
        using ELEM_T = float;                                           \
        return __VA_ARGS__();                                           \
      }                                                                 \
    }                                                                   \
  }()
