#include "core/virtual_pages.hpp"

#include <algorithm>
#include <stdexcept>

#include "core/retirement.hpp"

namespace vmm {

VirtualPages::~VirtualPages() {
  for (Retiring& r : retiring_) count_failure([&] { backend_.release_event(r.event); });
  retiring_.clear();
  for (auto& owned : ranges_) {
    ReservedRange& range = *owned;
    for (std::size_t i = 0; i < range.pages.size(); ++i) {
      if (range.pages[i].chunk != nullptr) {
        count_failure([&] { backend_.unmap(range.base + i * kChunkSize, kChunkSize); });
      }
    }
    count_failure([&] { backend_.unreserve(range.base, range.bytes); });
  }
}

template <typename F>
bool VirtualPages::count_failure(F&& cleanup) noexcept {
  return vmm::count_failure(backend_errors, std::forward<F>(cleanup));
}

ReservedRange* VirtualPages::reserve(std::size_t bytes, std::uint32_t filler_kind) {
  auto range = std::make_unique<ReservedRange>();
  range->filler_kind = filler_kind;
  range->pages.resize(bytes / kChunkSize);
  ranges_.reserve(ranges_.size() + 1);
  range->base = backend_.reserve(bytes);
  range->bytes = bytes;
  range->index = ranges_.size();
  reserved_virtual_bytes_ += bytes;
  ranges_.push_back(std::move(range));
  return ranges_.back().get();
}

PagePlan VirtualPages::plan(const ReservedRange& range, std::size_t rows, std::size_t stride,
                            std::size_t begin, std::size_t end,
                            const std::vector<std::size_t>& row_begins) const {
  enum Need : unsigned char { kNone, kPadding, kTokens };
  std::vector<Need> needed(range.pages.size(), kNone);
  const auto mark = [&](std::size_t from, std::size_t to, Need need) {
    for (std::size_t p = from / kChunkSize; p <= (to - 1) / kChunkSize; ++p) {
      if (needed[p] < need) needed[p] = need;
    }
  };
  if (end > begin) {
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t tokens = row_begins.empty() ? begin : std::min(std::max(begin, row_begins[r]), end);
      if (tokens > begin) mark(r * stride + begin, r * stride + tokens, kPadding);
      if (end > tokens) mark(r * stride + tokens, r * stride + end, kTokens);
    }
  }
  PagePlan out;
  for (std::size_t p = 0; p < range.pages.size(); ++p) {
    const PageSlot& slot = range.pages[p];
    if (needed[p] == kTokens && slot.padding) {
      // Taken out of retirement first, like any needed page: an out-of-memory retry while
      // memory is drawn finishes retirements, and must not unmap what unpad() will.
      if (slot.retire_serial != 0) out.reclaim.push_back(p);
      out.unpad.push_back(p);
      out.map.push_back(p);
    } else if (needed[p] != kNone) {
      if (slot.chunk == nullptr)
        (needed[p] == kTokens ? out.map : out.map_padding).push_back(p);
      else if (slot.retire_serial != 0)
        out.reclaim.push_back(p);
    } else if (slot.chunk != nullptr && slot.retire_serial == 0) {
      out.drop.push_back(p);
    }
  }
  return out;
}

std::size_t VirtualPages::reclaim(ReservedRange& range, const std::vector<std::size_t>& pages,
                                  StreamId stream) {
  std::vector<std::uint64_t> waited;
  std::size_t own = 0;
  for (std::size_t p : pages) {
    if (!range.pages[p].padding) ++own;
    const std::uint64_t serial = range.pages[p].retire_serial;
    range.pages[p].retire_serial = 0;
    if (std::find(waited.begin(), waited.end(), serial) != waited.end()) continue;
    waited.push_back(serial);
    for (const Retiring& r : retiring_) {
      if (r.serial != serial || r.event == 0) continue;
      try {
        backend_.stream_wait_event(stream, r.event);
      } catch (const std::exception&) {
        ++backend_errors;
        count_failure([&] { backend_.synchronize(); });
      }
    }
  }
  range.live_pages += own;
  range.live_padding += pages.size() - own;
  live_bytes.increase(static_cast<std::int64_t>(own * kChunkSize));
  return own;
}

std::size_t VirtualPages::retire(ReservedRange& range, const std::vector<std::size_t>& pages,
                                 StreamId stream) {
  if (pages.empty()) return 0;
  const std::uint64_t serial = next_serial_++;
  std::size_t own = 0;
  for (std::size_t p : pages) {
    range.pages[p].retire_serial = serial;
    if (!range.pages[p].padding) ++own;
  }
  range.live_pages -= own;
  range.live_padding -= pages.size() - own;
  live_bytes.decrease(static_cast<std::int64_t>(own * kChunkSize));
  Retiring entry{&range, pages, 0, serial};
  try {
    retiring_.reserve(retiring_.size() + 1);
    entry.event = backend_.record_event(stream);
  } catch (const std::exception&) {
    // No event: wait for the whole device instead, then the pages go at once.
    ++backend_errors;
    count_failure([&] { backend_.synchronize(); });
    entry.event = 0;
  }
  retiring_.push_back(std::move(entry));
  return own;
}

void VirtualPages::map_chunks(ReservedRange& range, const std::vector<std::size_t>& pages,
                              const std::vector<Chunk*>& chunks) {
  std::size_t mapped = 0;
  try {
    for (; mapped < pages.size(); ++mapped) {
      backend_.map(range.base + pages[mapped] * kChunkSize, chunks[mapped]->handle, kChunkSize);
    }
    // Runs of consecutive pages get one set_access call each (its cost is per handle).
    for (std::size_t i = 0; i < pages.size();) {
      std::size_t j = i + 1;
      while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
      backend_.set_access(range.base + pages[i] * kChunkSize, (j - i) * kChunkSize);
      i = j;
    }
  } catch (...) {
    for (std::size_t i = 0; i < mapped; ++i) {
      count_failure([&] { backend_.unmap(range.base + pages[i] * kChunkSize, kChunkSize); });
    }
    throw;
  }
  range.mapped_pages += pages.size();
}

void VirtualPages::map(ReservedRange& range, const std::vector<std::size_t>& pages,
                       const std::vector<Chunk*>& chunks) {
  map_chunks(range, pages, chunks);
  for (std::size_t i = 0; i < pages.size(); ++i) range.pages[pages[i]] = PageSlot{chunks[i], 0, false};
  range.live_pages += pages.size();
  live_bytes.increase(static_cast<std::int64_t>(pages.size() * kChunkSize));
}

void VirtualPages::map_padding(ReservedRange& range, const std::vector<std::size_t>& pages, Chunk* fresh) {
  if (pages.empty()) return;
  Filler* held = nullptr;
  for (Filler& f : fillers_) {
    if (f.kind == range.filler_kind) held = &f;
  }
  Chunk* chunk = held != nullptr ? held->chunk : fresh;
  if (chunk == nullptr || (held != nullptr && fresh != nullptr)) {
    throw std::logic_error(
        "vmmalloc: map_padding needs a fresh filler exactly when none of the kind is held");
  }
  if (held == nullptr) fillers_.reserve(fillers_.size() + 1);  // before mapping: nothing to undo after
  map_chunks(range, pages, std::vector<Chunk*>(pages.size(), chunk));
  for (std::size_t p : pages) range.pages[p] = PageSlot{chunk, 0, true};
  range.live_padding += pages.size();
  if (held == nullptr) {
    fillers_.push_back({range.filler_kind, chunk, pages.size()});
    live_bytes.increase(static_cast<std::int64_t>(kChunkSize));
  } else {
    held->mappings += pages.size();
  }
}

void VirtualPages::unmapped_filler_page(Chunk* chunk) {
  for (Filler& f : fillers_) {
    if (f.chunk == chunk) --f.mappings;
  }
}

void VirtualPages::unpad(ReservedRange& range, const std::vector<std::size_t>& pages, StreamId stream) {
  if (pages.empty()) return;
  for (std::size_t p : pages) {
    if (!range.pages[p].padding || range.pages[p].retire_serial != 0) {
      throw std::logic_error("vmmalloc: unpad of a page that is not live padding (reclaim it first)");
    }
  }
  // Work queued so far may still read the filler at these addresses (Note [KV pages]: the
  // driver does not wait); a page reclaimed from retirement made `stream` wait for its
  // retirement's work, so an event recorded on `stream` now covers that too.
  EventId event = 0;
  try {
    event = backend_.record_event(stream);
    backend_.wait_event(event);
  } catch (const std::exception&) {
    ++backend_errors;
    count_failure([&] { backend_.synchronize(); });
  }
  if (event != 0) count_failure([&] { backend_.release_event(event); });
  unmap_padding_now(range, pages);
}

void VirtualPages::unmap_padding_now(ReservedRange& range, const std::vector<std::size_t>& pages) {
  for (std::size_t p : pages) {
    // A filler whose unmap failed is still mapped there: it keeps that mapping counted, so
    // it never goes back to the pool to serve a tensor through this address too.
    if (count_failure([&] { backend_.unmap(range.base + p * kChunkSize, kChunkSize); }))
      unmapped_filler_page(range.pages[p].chunk);
    range.pages[p] = PageSlot{};
    --range.live_padding;
    --range.mapped_pages;
  }
}

std::vector<Chunk*> VirtualPages::release_unused_fillers() {
  std::vector<Chunk*> out;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < fillers_.size(); ++i) {
    if (fillers_[i].mappings == 0) {
      out.push_back(fillers_[i].chunk);
      continue;
    }
    fillers_[kept++] = fillers_[i];
  }
  fillers_.resize(kept);
  live_bytes.decrease(static_cast<std::int64_t>(out.size() * kChunkSize));
  return out;
}

void VirtualPages::free(ReservedRange& range, StreamId stream) {
  std::vector<std::size_t> live;
  for (std::size_t p = 0; p < range.pages.size(); ++p) {
    if (range.pages[p].chunk != nullptr && range.pages[p].retire_serial == 0) live.push_back(p);
  }
  retire(range, live, stream);
  range.freed = true;
  maybe_destroy(&range);
}

void VirtualPages::unmap_pages(ReservedRange& range, const std::vector<std::size_t>& pages,
                               std::uint64_t serial, std::vector<Chunk*>& out) {
  for (std::size_t p : pages) {
    PageSlot& slot = range.pages[p];
    if (slot.chunk == nullptr || slot.retire_serial != serial) continue;  // taken back since
    // A chunk whose unmap failed is still mapped there: it is kept out of the pool (lost,
    // and counted in page_backend_errors) rather than handed to a tensor through two addresses.
    const bool unmapped = count_failure([&] { backend_.unmap(range.base + p * kChunkSize, kChunkSize); });
    if (unmapped && slot.padding)
      unmapped_filler_page(slot.chunk);  // it goes back once no page maps it (release_unused_fillers)
    else if (unmapped)
      out.push_back(slot.chunk);
    slot = PageSlot{};
    --range.mapped_pages;
  }
}

std::vector<Chunk*> VirtualPages::finish_retiring(bool wait) {
  std::vector<Chunk*> freed;
  if (retiring_.empty()) return freed;
  std::vector<ReservedRange*> touched;
  finish_completed(retiring_, wait, backend_, backend_errors, [&](const Retiring& r) {
    unmap_pages(*r.range, r.pages, r.serial, freed);
    touched.push_back(r.range);
  });
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  for (ReservedRange* range : touched) maybe_destroy(range);
  return freed;
}

void VirtualPages::maybe_destroy(ReservedRange* range) {
  if (!range->freed || range->mapped_pages != 0) return;
  // Older retirements of pages taken back and unmapped since may still name the range.
  std::size_t kept = 0;
  for (std::size_t i = 0; i < retiring_.size(); ++i) {
    if (retiring_[i].range == range) {
      if (retiring_[i].event != 0) count_failure([&] { backend_.release_event(retiring_[i].event); });
      continue;
    }
    if (kept != i) retiring_[kept] = std::move(retiring_[i]);
    ++kept;
  }
  retiring_.resize(kept);
  count_failure([&] { backend_.unreserve(range->base, range->bytes); });
  reserved_virtual_bytes_ -= range->bytes;
  const std::size_t index = range->index;
  ranges_[index] = std::move(ranges_.back());
  ranges_[index]->index = index;
  ranges_.pop_back();
}

void VirtualPages::append_stats(StatList& out) const {
  append_stat(out, "vmm.kv_mapped_bytes", live_bytes);
  out.emplace_back("vmm.virtual_ranges", static_cast<std::int64_t>(ranges_.size()));
  out.emplace_back("vmm.virtual_reserved_bytes", static_cast<std::int64_t>(reserved_virtual_bytes_));
  std::int64_t retiring_pages = 0;
  for (const Retiring& r : retiring_) retiring_pages += static_cast<std::int64_t>(r.pages.size());
  out.emplace_back("vmm.retiring_pages", retiring_pages);
  std::int64_t padding_pages = 0;
  for (const auto& range : ranges_) padding_pages += static_cast<std::int64_t>(range->live_padding);
  out.emplace_back("vmm.kv_padding_pages", padding_pages);
  out.emplace_back("vmm.page_backend_errors", backend_errors);
}

}  // namespace vmm
