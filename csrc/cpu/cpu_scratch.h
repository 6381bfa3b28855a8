// cpu_scratch.h — uninitialised fp32 scratch kept between calls, for the CPU kernels' per-call
// buffers of several MiB: the flash forward's K^T / widened V copies and decode's split
// partials (fastattn/cpu_dispatch.h's tier libraries each keep their own).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <stdlib.h>
#include <sys/mman.h>
#endif

namespace fastattn {
namespace cpu {

// Uninitialised fp32 scratch for a call (the flash forward's K^T / widened V copies, today of
// one chunk of slices; the KV-cache kernel's split partials). Fresh multi-megabyte allocations
// are new pages every call, and first-touching them one 4 KiB page fault at a time cost as much
// as the widening pass itself (measured: ~35 ms of page faults for bf16 K^T + V of a whole
// call at B1 H16 S2048 D128, before the chunks). Where Linux offers transparent huge pages on
// request, a 2 MiB-aligned buffer with MADV_HUGEPAGE takes 512x fewer faults; elsewhere it is
// a plain allocation. Even the huge-page faults were ~13% of an fp32 call at that shape on
// the 2-core VM this was tuned on (a VM's freed pages may go back to the host, and every
// fresh buffer is zeroed again), so one buffer of up to kRetainBytes is kept between calls
// and the next call that fits reuses it: a model's prefill calls all have the same shape.
// Larger buffers are freed at once: their first-touch cost grows with the sequence length,
// the attention with its square, so past that size the faults are a few percent.
inline constexpr size_t kRetainBytes = size_t(64) << 20;

// An AddressSanitizer build (setup.py's FASTATTN_SAN_FLAGS) allocates exactly what each call
// asks for and retains nothing: a kept or rounded-up buffer's slack would hide an access past
// the end of this call's scratch.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kExactAllocations = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kExactAllocations = true;
#else
inline constexpr bool kExactAllocations = false;
#endif
#else
inline constexpr bool kExactAllocations = false;
#endif
inline std::mutex g_cached_mutex;
inline void* g_cached = nullptr;  // the retained buffer (process-wide, one per loaded CPU tier)
inline size_t g_cached_bytes = 0;

// The retained buffer if it holds at least `bytes` (it leaves the cache), else nullptr.
inline void* take_cached(size_t bytes, size_t* capacity) {
  std::lock_guard<std::mutex> lock(g_cached_mutex);
  if (g_cached == nullptr || g_cached_bytes < bytes) return nullptr;
  void* p = g_cached;
  *capacity = g_cached_bytes;
  g_cached = nullptr;
  g_cached_bytes = 0;
  return p;
}

// Retains p when it is small enough and larger than the retained buffer; frees the other.
inline void give_back_cached(void* p, size_t bytes) {
  if (bytes <= kRetainBytes) {
    std::lock_guard<std::mutex> lock(g_cached_mutex);
    if (bytes > g_cached_bytes) {
      std::swap(p, g_cached);
      std::swap(bytes, g_cached_bytes);
    }
  }
  std::free(p);
}

class ScratchBuffer {
 public:
  void allocate(size_t count) {
    release();
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(float);
    if (void* p = kExactAllocations ? nullptr : take_cached(bytes, &bytes_)) {
      data_ = static_cast<float*>(p);
      return;
    }
    bytes_ = bytes;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr size_t kHuge = size_t(2) << 20;
    if (!kExactAllocations && bytes >= 2 * kHuge) {
      void* p = nullptr;
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      if (posix_memalign(&p, kHuge, rounded) == 0) {
        madvise(p, rounded, MADV_HUGEPAGE);
        data_ = static_cast<float*>(p);
        bytes_ = rounded;
        return;
      }
    }
#endif
    data_ = static_cast<float*>(std::malloc(bytes));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  float* get() const { return data_; }
  ~ScratchBuffer() { release(); }

 private:
  void release() {
    if (kExactAllocations) {
      std::free(data_);
    } else if (data_ != nullptr) {
      give_back_cached(data_, bytes_);
    }
    data_ = nullptr;
    bytes_ = 0;
  }
  float* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace cpu
}  // namespace fastattn
