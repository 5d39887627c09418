#include "core/pick_plan.hpp"

#include "core/retirement.hpp"

namespace vmm {

PickPlan::PickPlan(std::size_t large_spans, std::size_t single_spans, std::size_t large_chunks,
                   std::uint64_t mark)
    : large_chunks_(large_chunks), mark_(mark), large_(large_spans), single_(single_spans, nullptr) {
  for (auto& span : large_) span.reserve(large_chunks_);
}

void PickPlan::take(Chunk* chunk) { chunk->pick_mark = mark_; }

bool PickPlan::holds_handle(const std::vector<Chunk*>& span) {
  return !span.empty() && span.front()->handle_chunks > 1;
}

bool PickPlan::filled_in_part(const std::vector<Chunk*>& span) const {
  return !span.empty() && !holds_handle(span) && span.size() < large_chunks_;
}

void PickPlan::offer(const std::vector<Chunk*>& heads, const std::vector<Chunk*>& singles) {
  std::size_t h = 0;
  auto next_head = [&]() -> Chunk* {
    while (h < heads.size() && heads[h]->pick_mark == mark_) ++h;
    return h < heads.size() ? heads[h++] : nullptr;
  };
  std::vector<Chunk*> displaced;  // singles a large handle replaced, offered again below
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& span : large_) {
      // Pass 0: empty spans; pass 1: spans singles fill in part.
      if (pass == 0 ? !span.empty() : !filled_in_part(span)) continue;
      Chunk* head = next_head();
      if (head == nullptr) break;
      for (Chunk* c : span) c->pick_mark = 0;  // no pick's mark: free to take again
      displaced.insert(displaced.end(), span.begin(), span.end());
      span.clear();
      for (std::size_t k = 0; k < head->handle_chunks; ++k) {
        span.push_back(head + k);
        take(head + k);
      }
    }
  }
  std::size_t s = 0, d = 0;
  auto next_single = [&]() -> Chunk* {
    while (s < singles.size() && singles[s]->pick_mark == mark_) ++s;
    if (s < singles.size()) return singles[s++];
    return d < displaced.size() ? displaced[d++] : nullptr;
  };
  while (open_singles() > 0) {
    Chunk* c = next_single();
    if (c == nullptr) break;
    single_[filled_singles_++] = c;
    take(c);
  }
  for (auto& span : large_) {
    if (holds_handle(span)) continue;
    while (span.size() < large_chunks_) {
      Chunk* c = next_single();
      if (c == nullptr) break;
      span.push_back(c);
      take(c);
    }
  }
}

std::size_t PickPlan::open_large_spans() const {
  std::size_t n = 0;
  for (const auto& span : large_) {
    if (span.empty() || filled_in_part(span)) ++n;
  }
  return n;
}

std::size_t PickPlan::missing() const {
  std::size_t n = open_singles();
  for (const auto& span : large_) n += large_chunks_ - span.size();
  return n;
}

void PickPlan::create_rest(ChunkPool& pool, std::int64_t& failures) {
  const std::size_t created_before = created_.size();
  const std::size_t singles_before = filled_singles_;
  std::vector<std::size_t> sizes_before;
  sizes_before.reserve(large_.size());
  for (const auto& span : large_) sizes_before.push_back(span.size());
  try {
    for (auto& span : large_) {
      if (span.empty()) {
        created_.push_back(pool.create(large_chunks_));
        for (std::size_t k = 0; k < large_chunks_; ++k) span.push_back(created_.back() + k);
      }
      while (span.size() < large_chunks_) {
        created_.push_back(pool.create(1));
        span.push_back(created_.back());
      }
    }
    while (open_singles() > 0) {
      created_.push_back(pool.create(1));
      single_[filled_singles_++] = created_.back();
    }
  } catch (...) {
    for (std::size_t i = created_before; i < created_.size(); ++i) {
      count_failure(failures, [&] { pool.release(created_[i]); });
    }
    created_.resize(created_before);
    for (std::size_t i = 0; i < large_.size(); ++i) large_[i].resize(sizes_before[i]);
    for (std::size_t j = singles_before; j < filled_singles_; ++j) single_[j] = nullptr;
    filled_singles_ = singles_before;
    throw;
  }
}

void PickPlan::release_created(ChunkPool& pool, std::int64_t& failures) noexcept {
  for (Chunk* head : created_) count_failure(failures, [&] { pool.release(head); });
  created_.clear();
}

void PickPlan::clear() {
  for (auto& span : large_) span.clear();
  for (auto& c : single_) c = nullptr;
  filled_singles_ = 0;
}

std::vector<Chunk*> PickPlan::layout() const {
  std::vector<Chunk*> out;
  out.reserve(large_.size() * large_chunks_ + single_.size());
  for (const auto& span : large_) out.insert(out.end(), span.begin(), span.end());
  out.insert(out.end(), single_.begin(), single_.end());
  return out;
}

std::size_t PickPlan::created_chunks() const {
  std::size_t n = 0;
  for (const Chunk* head : created_) n += head->handle_chunks;
  return n;
}

}  // namespace vmm
