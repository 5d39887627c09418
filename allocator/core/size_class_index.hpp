// Free small blocks of one stream, indexed by exact size class (512-byte steps up to one
// chunk) with a two-level bitmap, so best fit, insertion and removal are O(1) and never
// allocate: blocks are linked through their own free_prev/free_next fields.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/backend.hpp"

namespace vmm {

constexpr std::size_t kSmallRounding = 512;
constexpr std::size_t kSizeClasses = kChunkSize / kSmallRounding;  // 4096: 64 words of 64 bits
static_assert(kSizeClasses == 64 * 64, "the two-level bitmap covers exactly 4096 classes");

template <typename Block>
class SizeClassIndex {
 public:
  void insert(Block* block) {
    const std::size_t c = size_class(block->size);
    block->free_prev = nullptr;
    block->free_next = heads_[c];
    if (heads_[c]) heads_[c]->free_prev = block;
    heads_[c] = block;
    words_[c >> 6] |= std::uint64_t{1} << (c & 63);
    summary_ |= std::uint64_t{1} << (c >> 6);
  }

  void remove(Block* block) {
    const std::size_t c = size_class(block->size);
    if (block->free_prev)
      block->free_prev->free_next = block->free_next;
    else
      heads_[c] = block->free_next;
    if (block->free_next) block->free_next->free_prev = block->free_prev;
    if (heads_[c] == nullptr) {
      words_[c >> 6] &= ~(std::uint64_t{1} << (c & 63));
      if (words_[c >> 6] == 0) summary_ &= ~(std::uint64_t{1} << (c >> 6));
    }
  }

  // A free block of the smallest size >= `size` (a multiple of kSmallRounding), or null.
  Block* best_fit(std::size_t size) const {
    const std::size_t c = size_class(size);
    std::size_t word = c >> 6;
    std::uint64_t bits = words_[word] & (~std::uint64_t{0} << (c & 63));
    if (bits == 0) {
      if (word == 63) return nullptr;
      const std::uint64_t above = summary_ & (~std::uint64_t{0} << (word + 1));
      if (above == 0) return nullptr;
      word = static_cast<std::size_t>(__builtin_ctzll(above));
      bits = words_[word];
    }
    return heads_[(word << 6) | static_cast<std::size_t>(__builtin_ctzll(bits))];
  }

  bool empty() const { return summary_ == 0; }

  // Visits every free block (slow paths only).
  template <typename F>
  void for_each(F&& f) const {
    for (Block* head : heads_) {
      for (Block* b = head; b != nullptr;) {
        Block* next = b->free_next;
        f(b);
        b = next;
      }
    }
  }

 private:
  static std::size_t size_class(std::size_t size) { return size / kSmallRounding - 1; }

  Block* heads_[kSizeClasses] = {};
  std::uint64_t words_[64] = {};
  std::uint64_t summary_ = 0;
};

}  // namespace vmm
