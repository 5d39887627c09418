#include "core/mapping_cache.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>

#include "core/errors.hpp"
#include "core/retirement.hpp"

namespace vmm {

MappingCache::MappingCache(Backend& backend, ChunkPool& pool, const Config& config)
    : backend_(backend), pool_(pool), config_(config), progress_(backend, counters_.backend_errors) {
  max_mapped_bytes_ = config.max_mapped_bytes != 0 ? config.max_mapped_bytes : 4 * backend.total_memory();
  const std::size_t large = config.large_handle_size / kChunkSize;
  large_chunks_ = large >= 2 ? large : 0;
}

MappingCache::~MappingCache() {
  finish_retiring(/*wait=*/true);
  progress_.forget();
  for (auto& m : mappings_) {
    count_failure([&] {
      if (!m->chunks.empty() && !unmapped_) backend_.unmap(m->base, m->chunks.size() * kChunkSize);
    });
    count_failure([&] { backend_.unreserve(m->base, m->reserved_bytes); });
  }
}

template <typename F>
void MappingCache::count_failure(F&& cleanup) noexcept {
  vmm::count_failure(counters_.backend_errors, std::forward<F>(cleanup));
}

// Note [Streams before stitches]: first only memory that needs no wait, growing within the
// slack; memory of busy streams (behind a wait) only when that fails and the caller allows
// growth, i.e. after it finished pending frees and took back small segments.
Mapping* MappingCache::acquire(std::size_t chunks, StreamId stream, bool allow_create,
                               std::size_t growth_budget) {
  if (capture_safe_) {
    // Note [Capture-safe mode]: only memory that needs no wait; past the slack, chunks of
    // ready mappings before growth, then growth without limit (pick_chunks). Growth within
    // the slack that the cap or the device refuses is tried once more taking ready
    // mappings' chunks first, since the out-of-memory retry cannot run during a capture.
    StreamAffinity affinity(stream);
    if (!allow_create || growth_budget == 0) {
      return serve(chunks, stream, allow_create, growth_budget, &affinity, /*count_miss=*/true);
    }
    try {
      return serve(chunks, stream, true, growth_budget, &affinity, /*count_miss=*/true);
    } catch (const CapExceeded&) {
    } catch (const DeviceOutOfMemory&) {
    }
    return serve(chunks, stream, true, /*growth_budget=*/0, &affinity, /*count_miss=*/false);
  }
  if (config_.cross_stream_reuse == CrossStreamReuse::kAlways) {
    return serve(chunks, stream, allow_create, growth_budget, nullptr, /*count_miss=*/true);
  }
  StreamAffinity affinity(stream);
  std::exception_ptr refused;  // growth within the slack, refused by the cap or the device
  try {
    if (Mapping* m = serve(chunks, stream, allow_create, growth_budget, &affinity, true)) return m;
  } catch (const CapExceeded&) {
    refused = std::current_exception();
  } catch (const DeviceOutOfMemory&) {
    refused = std::current_exception();
  }
  if (!allow_create) return nullptr;
  // After a refusal only memory already there may serve; otherwise the refusal goes on to
  // the caller's out-of-memory retry (Note [Out-of-memory retry]), as it would have.
  const std::int64_t waits = counters_.cross_stream_waits;
  Mapping* m = serve(chunks, stream, /*allow_create=*/refused == nullptr, growth_budget, nullptr,
                     /*count_miss=*/false);
  if (m == nullptr && refused) std::rethrow_exception(refused);
  if (counters_.cross_stream_waits != waits) ++counters_.cross_stream_fallbacks;
  return m;
}

Mapping* MappingCache::serve(std::size_t chunks, StreamId stream, bool allow_create,
                             std::size_t growth_budget, const StreamAffinity* affinity, bool count_miss) {
  if (Mapping* m = find_ready(chunks, stream, affinity, count_miss)) {
    use(m, chunks, stream);
    ++counters_.hits;
    return m;
  }
  if (skipped_busy_ > 0 && config_.repair_blocked && config_.stitching && !capture_safe_) {
    if (Mapping* m = repair(chunks, stream, allow_create, growth_budget, affinity)) return m;
  }
  return stitch(chunks, stream, allow_create, growth_budget, affinity);
}

// Note [Foreign streams]
// The first pass of Note [Streams before stitches] may take an idle mapping only if each
// chunk it hands out was last used on the request's stream or is known idle. A mapping's
// own release sets its chunks' streams, but a chunk shared with other mappings may since
// have been used, and freed, through one of them on another stream. Walking the chunks on
// every hit to find out cost 12% of the cached path, so each mapping carries a flag kept
// where chunk streams change: a chunk freed on stream X flags every other mapping of it
// whose last stream is not X (in the loop over sharing mappings the release already does);
// a mapping's own release clears its flag when it used all its chunks, and keeps it
// otherwise (its tail may carry older streams); forget_streams clears every idle
// mapping's flag. A set flag only means "walk the chunks", so the choice is exactly what
// the walk alone gives.
void MappingCache::release(Mapping* mapping, StreamId stream) {
  const std::size_t used = mapping->used;
  mapping->in_use = false;
  mapping->used = 0;
  if (used == mapping->chunks.size()) {
    mapping->foreign_streams = false;
  } else if (mapping->last_stream != stream && mapping->last_stream != kNoStream) {
    mapping->foreign_streams = true;
  }
  mapping->last_stream = stream;
  mapping->released = ++releases_;
  // A chunk mapped only here needs no walk of its mapping list: the bulk update below
  // covers `mapping` itself.
  for (std::size_t i = 0; i < used; ++i) {
    Chunk* chunk = mapping->chunks[i];
    pool_.mark_free(chunk, stream);
    if (chunk->mappings.size() == 1) continue;
    for (Mapping* other : chunk->mappings) {
      if (other == mapping) continue;
      --other->busy_chunks;
      if (other->last_stream != stream) other->foreign_streams = true;
    }
  }
  mapping->busy_chunks -= used;
  index_insert(mapping, stream);
  lru_push(mapping);
}

// Idle mappings whose chunks are busy elsewhere are skipped, up to max_ready_scan of them:
// a fitting ready mapping deeper in the index saves a stitch (>= 23 us per chunk on an
// H200), while a crowd of blocked mappings still ends in a stitch, not an unbounded walk.
Mapping* MappingCache::try_ready_group(std::size_t chunks, std::size_t max_chunks, StreamId stream,
                                       const StreamAffinity* affinity) {
  std::size_t skipped = 0;
  for (auto it = idle_.lower_bound(ReadyKey{stream, chunks, 0, nullptr});
       it != idle_.end() && it->stream == stream && it->chunks <= max_chunks; ++it) {
    Mapping* m = it->mapping;
    // A prefix ending inside a handle is no candidate at all (Note [Large handles]); asked
    // after the cheap busy test, since it reads a chunk.
    const bool busy = m->busy_chunks != 0;
    if (!busy && wastes_tail(m, chunks)) {
      if (++skipped == config_.max_ready_scan) break;
      continue;
    }
    if (!busy && (affinity == nullptr || reusable_without_wait(m, chunks, *affinity))) return m;
    ++skipped_busy_;
    if (++skipped == config_.max_ready_scan) break;
  }
  return nullptr;
}

// Best fit among ready mappings of `chunks` to `chunks * reuse_ratio` chunks: first those
// last used on `stream`, then those known idle, then those of other streams (which cost
// a GPU-side wait in use()); with `affinity`, only the first two, and only mappings whose
// chunks were all last used on `stream` or are known idle. A much larger mapping is not
// used for a small request: its range would stay busy while most of its chunks sit idle,
// and the next request that needs it would have to stitch.
Mapping* MappingCache::find_ready(std::size_t chunks, StreamId stream, const StreamAffinity* affinity,
                                  bool count_miss) {
  skipped_busy_ = 0;
  Mapping* found = find_ready_in_groups(chunks, stream, affinity);
  if (found == nullptr && count_miss) ++(skipped_busy_ > 0 ? counters_.misses_busy : counters_.misses_empty);
  return found;
}

std::size_t MappingCache::max_reuse_chunks(std::size_t chunks) const {
  const double limit = std::floor(static_cast<double>(chunks) * config_.reuse_ratio);
  if (limit >= static_cast<double>(std::numeric_limits<std::size_t>::max() / 2)) {
    return std::numeric_limits<std::size_t>::max() / 2;
  }
  return std::max(chunks, static_cast<std::size_t>(limit));
}

Mapping* MappingCache::find_ready_in_groups(std::size_t chunks, StreamId stream,
                                            const StreamAffinity* affinity) {
  if (idle_.empty()) return nullptr;
  const std::size_t max_chunks = max_reuse_chunks(chunks);
  if (Mapping* m = try_ready_group(chunks, max_chunks, stream, affinity)) return m;
  if (stream != kNoStream) {
    if (Mapping* m = try_ready_group(chunks, max_chunks, kNoStream, affinity)) return m;
  }
  if (affinity != nullptr) return nullptr;  // every other stream's memory needs a wait
  for (auto it = idle_.begin(); it != idle_.end();) {
    const StreamId other = it->stream;
    if (other == kNoStream) break;  // kNoStream sorts last and was tried above
    if (other != stream) {
      if (Mapping* m = try_ready_group(chunks, max_chunks, other, nullptr)) return m;
    }
    it = idle_.lower_bound(ReadyKey{other + 1, 0, 0, nullptr});
  }
  return nullptr;
}

// A mapping's index stream is its own last use; its chunks may have been used since
// through other mappings, on other streams.
bool MappingCache::reusable_without_wait(const Mapping* mapping, std::size_t chunks,
                                         const StreamAffinity& affinity) {
  // Note [Foreign streams]: callers look only at mappings indexed under the request's
  // stream or kNoStream, so an unflagged one qualifies.
  if (!mapping->foreign_streams) return true;
  for (std::size_t i = 0; i < chunks; ++i) {
    if (!affinity.no_wait(mapping->chunks[i]->stream)) return false;
  }
  return true;
}

void MappingCache::wait_for_chunks(Chunk* const* chunks, std::size_t n, StreamId stream) {
  // Waits first, so that a failing event call leaves everything as it was.
  const StreamAffinity affinity(stream);  // what needs no wait, defined once
  StreamId waited[8];
  std::size_t n_waited = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const StreamId last = chunks[i]->stream;
    if (affinity.no_wait(last)) continue;
    if (std::find(waited, waited + n_waited, last) != waited + n_waited) continue;
    const EventId event = backend_.record_event(last);
    try {
      backend_.stream_wait_event(stream, event);
    } catch (...) {
      count_failure([&] { backend_.release_event(event); });
      throw;
    }
    count_failure([&] { backend_.release_event(event); });
    ++counters_.cross_stream_waits;
    if (n_waited < 8) waited[n_waited++] = last;
  }
}

void MappingCache::use(Mapping* mapping, std::size_t chunks, StreamId stream) {
  wait_for_chunks(mapping->chunks.data(), chunks, stream);
  index_erase(mapping);
  lru_unlink(mapping);
  mapping->in_use = true;
  mapping->used = chunks;
  mapping->use_stream = stream;
  for (std::size_t i = 0; i < chunks; ++i) {
    Chunk* chunk = mapping->chunks[i];
    pool_.mark_busy(chunk);
    if (chunk->mappings.size() == 1) continue;  // see release()
    for (Mapping* other : chunk->mappings) {
      if (other != mapping) ++other->busy_chunks;
    }
  }
  mapping->busy_chunks += chunks;
}

// Note [Breaking ready mappings]
// When free chunks that feed no ready mapping run out, a stitch must take chunks of ready
// mappings, and each mapping it takes one chunk from stops being ready: the next request of
// its size stitches in turn. Chunks taken in pool order came a few from each of many
// mappings. So whole ready mappings are consumed, least recently released first: as few
// mappings as possible break, and the coldest ones. (Measured under FSDP2: 15% fewer
// stitches. Most stitches never get here; they take the free chunks of mappings that one
// busy chunk already blocks: bench/NOTES.md, "Several GPUs".)
void MappingCache::take_from_ready(PickPlan& plan, const StreamAffinity* affinity, const Mapping* exclude) {
  // Handles offered are marked with their own serial, so that one shared by two ready
  // mappings is offered once; those the plan already took carry its mark and are skipped.
  const std::uint64_t taken = plan.mark();
  const std::uint64_t offered = ++pick_serial_;
  std::size_t open_large = plan.open_large_spans();  // spans a large handle offered may fill
  if (exclude != nullptr) {
    for (Chunk* c : exclude->chunks) c->pick_mark = offered;
  }
  const std::size_t need = plan.missing();
  std::vector<Chunk*> heads, singles;
  std::size_t gathered = 0;
  for (Mapping* m = lru_head_; m != nullptr && gathered < need; m = m->lru_next) {
    if (!is_ready(m)) continue;
    for (Chunk* c : m->chunks) {
      if (gathered >= need) break;
      // A large handle's chunks follow its head in every mapping (Note [Large handles]).
      if (!c->is_head() || c->pick_mark == taken || c->pick_mark == offered) continue;
      const bool large = c->handle_chunks > 1;
      if (large && open_large == 0) continue;  // nothing it could fill: it would not count
      if (affinity != nullptr && handle_blocks(c, affinity)) continue;
      c->pick_mark = offered;
      if (large) {
        heads.push_back(c);
        --open_large;
      } else {
        singles.push_back(c);
      }
      gathered += c->handle_chunks;
    }
  }
  plan.offer(heads, singles);
}

bool MappingCache::pick_chunks(PickPlan& plan, bool reuse_free, bool allow_create, std::size_t growth_budget,
                               const StreamAffinity* affinity, const Mapping* exclude) {
  if (reuse_free) {
    // Note [Growth slack]: free chunks no ready mapping needs first; chunks of ready
    // mappings only when growing within the slack cannot cover the rest.
    const std::size_t want = plan.missing();
    std::vector<Chunk*> heads, singles;
    std::size_t feeding = 0;
    for (Chunk* c : pool_.all()) {
      if (!c->is_head()) continue;
      const bool large = c->handle_chunks > 1;
      if (large && plan.large_spans() == 0) continue;
      if (handle_blocks(c, affinity)) continue;
      // A large handle's chunks share one mapping list (Note [Large handles]).
      if (exclude != nullptr &&
          std::find(c->mappings.begin(), c->mappings.end(), exclude) != c->mappings.end()) {
        continue;
      }
      const bool feeds_ready =
          std::any_of(c->mappings.begin(), c->mappings.end(), [](const Mapping* m) { return is_ready(m); });
      if (feeds_ready) {
        feeding += c->handle_chunks;
      } else if (large) {
        if (heads.size() < plan.large_spans()) heads.push_back(c);
      } else if (singles.size() < want) {
        singles.push_back(c);
      }
    }
    plan.offer(heads, singles);
    const std::size_t missing = plan.missing();
    const bool grow = missing > 0 && allow_create && missing <= growth_budget;
    if (missing > 0 && !grow && feeding > 0) take_from_ready(plan, affinity, exclude);
  }
  // Note [Streams before stitches]: without waits, growth stays within the slack, except
  // in capture-safe mode, where no later pass may wait instead (Note [Capture-safe mode]).
  const std::size_t missing = plan.missing();
  const bool may_create = allow_create && (affinity == nullptr || capture_safe_ || missing <= growth_budget);
  if (missing > 0 && !may_create) {
    plan.clear();
    return false;
  }
  try {
    plan.create_rest(pool_, counters_.backend_errors);
  } catch (...) {
    plan.clear();
    throw;
  }
  return true;
}

PickPlan MappingCache::stitch_plan(std::size_t chunks) {
  const std::size_t large = large_chunks_ > 0 ? chunks / large_chunks_ : 0;
  return PickPlan(large, chunks - large * large_chunks_, large_chunks_, ++pick_serial_);
}

Mapping* MappingCache::stitch(std::size_t chunks, StreamId stream, bool allow_create,
                              std::size_t growth_budget, const StreamAffinity* affinity) {
  if (!allow_create && (!config_.stitching || pool_.free_count() < chunks)) return nullptr;
  PickPlan plan = stitch_plan(chunks);
  if (!pick_chunks(plan, config_.stitching, allow_create, growth_budget, affinity)) return nullptr;
  std::vector<Chunk*> picked = plan.layout();
  const std::size_t reused = picked.size() - plan.created_chunks();

  const std::size_t bytes = picked.size() * kChunkSize;
  std::uintptr_t base = 0;
  std::size_t mapped = 0;  // chunks mapped, always whole handles
  std::size_t handles = 0;
  auto mapping = std::make_unique<Mapping>();
  try {
    mapping->chunks.reserve(picked.size());
    mappings_.reserve(mappings_.size() + 1);
    for (Chunk* c : picked) c->mappings.reserve(c->mappings.size() + 1);
    base = backend_.reserve(bytes);
    while (mapped < picked.size()) {
      const Chunk* head = picked[mapped];
      backend_.map(base + mapped * kChunkSize, head->handle, head->handle_chunks * kChunkSize);
      mapped += head->handle_chunks;
      ++handles;
    }
    backend_.set_access(base, bytes);
  } catch (...) {
    if (mapped > 0) count_failure([&] { backend_.unmap(base, mapped * kChunkSize); });
    if (base != 0) count_failure([&] { backend_.unreserve(base, bytes); });
    plan.release_created(pool_, counters_.backend_errors);
    throw;
  }

  // From here on nothing throws (capacity was reserved above), so state stays consistent.
  Mapping* m = mapping.get();
  m->base = base;
  m->reserved_bytes = bytes;
  m->chunks = std::move(picked);
  m->id = next_id_++;
  m->index = mappings_.size();
  mappings_.push_back(std::move(mapping));
  for (Chunk* c : m->chunks) c->mappings.push_back(m);  // all free: busy_chunks stays 0
  mappings_stat.increase(1);
  mapped_bytes_stat.increase(static_cast<std::int64_t>(bytes));
  if (reused > 0) {
    ++counters_.stitches;
    counters_.stitched_bytes += static_cast<std::int64_t>(bytes);
    counters_.stitched_handles += static_cast<std::int64_t>(handles);
  } else {
    ++counters_.fresh_mappings;
  }
  try {
    use(m, chunks, stream);
  } catch (...) {
    // Only the cross-stream event calls can throw; give the mapping back as idle.
    m->foreign_streams = true;  // its chunks' streams are whatever they were
    lru_push(m);
    index_insert(m, kNoStream);
    throw;
  }
  enforce_bounds();
  return m;
}

// Note [Repairing blocked mappings]
// Under shapes that change every step, most misses find fitting idle mappings that a few
// busy chunks block: stitches since mapped those chunks elsewhere, and they are in use
// there. A stitch of n chunks costs n grants (cuMemSetAccess, ~30 us each: docs/FACTS.md) and
// adds a mapping sharing n more chunks, which blocks others in turn. Instead the candidate
// with the fewest blocked slots among the first n is mended: none blocked, it serves as it
// is (busy chunks past the prefix are not touched); otherwise its k blocked slots are
// unmapped and remapped to free chunks, picked as a stitch picks them (Note [Growth
// slack]), at ~50 us each (unmap, map, grant), and afterwards the mapping shares fewer
// chunks, not more. A repair is done for k <= n/3: each one takes free chunks other blocked
// mappings wanted, and the recorded traces' driver time grows past n/2 (bench/NOTES.md).
// It needs the candidate's last use finished, since unmapping does not wait for the GPU:
// Note [Stream progress] tells that without blocking. Until it can tell, the request
// stitches as before. The slots' old chunks stay where they are mapped elsewhere; a chunk
// mapped nowhere any more is an ordinary free chunk. A blocked chunk of a large handle
// (Note [Large handles]) blocks its whole handle: k counts the chunks of the handles to
// remap, and each is remapped whole, to a free large handle or to single chunks.
bool MappingCache::last_use_finished(const Mapping* mapping) {
  return mapping->last_stream == kNoStream ||
         progress_.finished(mapping->last_stream, mapping->released, releases_);
}

// Note [Large handles]: a request that ended inside a large handle would keep the
// handle's remaining chunks from every other use while it lives (a handle is picked only
// whole), so a live allocation would hold more memory than its chunks, and a request that
// fits under the cap beside the live allocations could fail (the stress test's phase
// "handles" caught exactly that). So a larger idle mapping serves a request only if the
// request ends at a handle's end. Stitches and repairs map whole handles, so every live
// allocation holds whole handles. Measured on the recorded traces (bench/NOTES.md "Several
// GPUs" item 16): this costs 10-20% more driver time than allowing a quarter of waste.
bool MappingCache::wastes_tail(const Mapping* mapping, std::size_t chunks) {
  // The usual hit, an exact fit, ends where its mapping ends, which a handle never overruns;
  // answered without touching the chunk.
  if (mapping->chunks.size() == chunks) return false;
  const Chunk* last = mapping->chunks[chunks - 1];
  return last->handle_pos + 1 != last->handle_chunks;
}

bool MappingCache::blocks_request(const Chunk* chunk, const StreamAffinity* affinity) {
  return chunk->busy || (affinity != nullptr && !affinity->no_wait(chunk->stream));
}

bool MappingCache::handle_blocks(const Chunk* head, const StreamAffinity* affinity) {
  for (std::size_t k = 0; k < head->handle_chunks; ++k) {
    if (blocks_request(head + k, affinity)) return true;
  }
  return false;
}

std::size_t MappingCache::blocked_slots(const Mapping* mapping, std::size_t chunks,
                                        const StreamAffinity* affinity, std::size_t limit) {
  std::size_t blocked = 0;
  for (std::size_t i = 0; i < chunks && blocked <= limit;) {
    const Chunk* c = mapping->chunks[i];
    if (blocks_request(c, affinity)) {
      blocked += c->handle_chunks;
      i += c->handle_chunks - c->handle_pos;  // past its handle
    } else {
      ++i;
    }
  }
  return blocked;
}

Mapping* MappingCache::repair(std::size_t chunks, StreamId stream, bool allow_create,
                              std::size_t growth_budget, const StreamAffinity* affinity) {
  // Without new chunks a repair needs free chunks for the request's free slots and as many
  // more outside the mapping for its blocked ones: at least `chunks` (stitch() asks the same).
  if (!allow_create && pool_.free_count() < chunks) return nullptr;
  const std::size_t worth = chunks / 3;
  const std::size_t max_chunks = max_reuse_chunks(chunks);
  Mapping* best = nullptr;
  std::size_t best_blocked = worth + 1;
  const StreamId groups[2] = {stream, kNoStream};
  for (std::size_t g = 0; g < (stream == kNoStream ? 1u : 2u) && best_blocked > 0; ++g) {
    std::size_t scanned = 0;
    for (auto it = idle_.lower_bound(ReadyKey{groups[g], chunks, 0, nullptr});
         it != idle_.end() && it->stream == groups[g] && it->chunks <= max_chunks; ++it) {
      Mapping* m = it->mapping;
      const std::size_t blocked =
          wastes_tail(m, chunks) ? best_blocked : blocked_slots(m, chunks, affinity, best_blocked);
      if (blocked < best_blocked && (blocked == 0 || last_use_finished(m))) {
        best = m;
        best_blocked = blocked;
        if (blocked == 0) break;
      }
      if (++scanned == config_.max_ready_scan) break;
    }
  }
  if (best == nullptr) return nullptr;
  if (best_blocked > 0) {
    // Without new chunks, the free chunks outside `best` must cover the slots (as stitch()
    // checks first): this miss recurs in loops that a small segment's chunk blocks.
    const std::size_t free_in_best = best->chunks.size() - best->busy_chunks;
    if (!allow_create && pool_.free_count() < best_blocked + free_in_best) return nullptr;
    // The first slot of each handle to remap, and how many are large.
    std::vector<std::size_t> spans;
    std::size_t large = 0;
    for (std::size_t i = 0; i < chunks;) {
      const Chunk* c = best->chunks[i];
      if (!blocks_request(c, affinity)) {
        ++i;
        continue;
      }
      spans.push_back(i - c->handle_pos);
      if (c->handle_chunks > 1) ++large;
      i += c->handle_chunks - c->handle_pos;
    }
    PickPlan plan(large, spans.size() - large, large_chunks_, ++pick_serial_);
    if (!pick_chunks(plan, /*reuse_free=*/true, allow_create, growth_budget, affinity, best)) {
      return nullptr;
    }
    try {
      remap_spans(best, spans, plan);
    } catch (...) {
      plan.release_created(pool_, counters_.backend_errors);
      throw;
    }
    ++counters_.repairs;
    counters_.repaired_chunks += static_cast<std::int64_t>(best_blocked);
  } else {
    ++counters_.prefix_reuses;
  }
  use(best, chunks, stream);  // a throw leaves it idle and indexed, as a hit would
  return best;
}

void MappingCache::remap_spans(Mapping* mapping, const std::vector<std::size_t>& spans,
                               const PickPlan& plan) {
  // What each span gets, in span order; capacity first: nothing below the driver calls may
  // throw.
  const std::vector<Chunk*>& singles = plan.singles();
  std::vector<std::size_t> lengths;
  lengths.reserve(spans.size());
  std::size_t next_large = 0, next_single = 0;
  std::vector<Chunk*> fresh;  // the new chunks of all spans, back to back
  for (std::size_t start : spans) {
    const std::size_t n = mapping->chunks[start]->handle_chunks;
    lengths.push_back(n);
    if (n > 1) {
      const std::vector<Chunk*>& fill = plan.large_span(next_large++);
      fresh.insert(fresh.end(), fill.begin(), fill.end());
    } else {
      fresh.push_back(singles[next_single++]);
    }
  }
  for (Chunk* c : fresh) c->mappings.reserve(c->mappings.size() + 1);
  // The head of the handle mapped at each slot, nullptr where nothing is mapped now.
  std::vector<Chunk*> mapped(mapping->chunks.size(), nullptr);
  for (std::size_t i = 0; i < mapped.size(); i += mapping->chunks[i]->handle_chunks) {
    mapped[i] = mapping->chunks[i];
  }
  const std::uintptr_t base = mapping->base;
  std::size_t handles = 0;
  try {
    std::size_t f = 0;
    for (std::size_t j = 0; j < spans.size(); ++j) {
      const std::size_t start = spans[j];
      const std::uintptr_t at = base + start * kChunkSize;
      backend_.unmap(at, lengths[j] * kChunkSize);
      mapped[start] = nullptr;
      for (std::size_t k = 0; k < lengths[j];) {
        Chunk* head = fresh[f + k];
        backend_.map(at + k * kChunkSize, head->handle, head->handle_chunks * kChunkSize);
        mapped[start + k] = head;
        k += head->handle_chunks;
        ++handles;
      }
      backend_.set_access(at, lengths[j] * kChunkSize);
      f += lengths[j];
    }
  } catch (...) {
    // The range may have a hole or a slot without access: it is dropped, as an eviction
    // would (its last use has finished, so nothing waits), and the chunks are untouched.
    for (std::size_t i = 0; i < mapped.size(); ++i) {
      if (mapped[i] != nullptr) {
        count_failure([&] { backend_.unmap(base + i * kChunkSize, mapped[i]->handle_chunks * kChunkSize); });
      }
    }
    count_failure([&] { backend_.unreserve(base, mapping->reserved_bytes); });
    ++counters_.evictions;
    detach(mapping);
    throw;
  }
  std::size_t f = 0;
  for (std::size_t j = 0; j < spans.size(); ++j) {
    for (std::size_t k = 0; k < lengths[j]; ++k, ++f) {
      Chunk*& slot = mapping->chunks[spans[j] + k];
      auto& list = slot->mappings;
      list.erase(std::find(list.begin(), list.end(), mapping));
      if (slot->busy) --mapping->busy_chunks;
      slot = fresh[f];
      slot->mappings.push_back(mapping);  // free: busy_chunks unchanged
    }
  }
  counters_.repaired_handles += static_cast<std::int64_t>(handles);
  mapping->foreign_streams = true;  // the fresh chunks' streams were not looked at
}

// Note [KV pages]: a page is one chunk, so any free single chunk serves; no stitch is
// involved, and no large handle (a page maps and unmaps alone).
std::vector<Chunk*> MappingCache::take_chunks(std::size_t n, StreamId stream, bool allow_create,
                                              std::size_t growth_budget) {
  if (!allow_create && pool_.free_count() < n) return {};
  PickPlan plan(0, n, large_chunks_, ++pick_serial_);
  const StreamAffinity affinity(stream);  // Note [Capture-safe mode]: no waits in it
  if (!pick_chunks(plan, /*reuse_free=*/true, allow_create, growth_budget,
                   capture_safe_ ? &affinity : nullptr)) {
    return {};
  }
  std::vector<Chunk*> picked = plan.layout();
  try {
    wait_for_chunks(picked.data(), picked.size(), stream);
  } catch (...) {
    plan.release_created(pool_, counters_.backend_errors);
    throw;
  }
  for (Chunk* c : picked) {
    pool_.mark_busy(c);
    for (Mapping* m : c->mappings) ++m->busy_chunks;
  }
  return picked;
}

void MappingCache::return_chunks(const std::vector<Chunk*>& chunks, StreamId stream) {
  for (Chunk* c : chunks) {
    pool_.mark_free(c, stream);
    for (Mapping* m : c->mappings) {
      --m->busy_chunks;
      if (m->last_stream != stream) m->foreign_streams = true;  // Note [Foreign streams]
    }
  }
}

void MappingCache::enforce_bounds() {
  if (capture_safe_) return;  // Note [Capture-safe mode]: owed until the next stitch after it
  while (lru_head_ != nullptr && (mappings_.size() > config_.max_cached_mappings ||
                                  static_cast<std::size_t>(mapped_bytes_stat.current) > max_mapped_bytes_)) {
    evict(lru_head_);
  }
  finish_retiring(/*wait=*/false);
}

void MappingCache::evict(Mapping* mapping) {
  // An unmapped (paused) range has nothing left for the GPU to read: no event to wait for.
  Retiring retiring{mapping->base, unmapped_ ? 0 : mapping->chunks.size() * kChunkSize,
                    mapping->reserved_bytes, 0};
  bool deferred = false;
  if (mapping->last_stream != kNoStream && !unmapped_) {
    try {
      retiring.event = backend_.record_event(mapping->last_stream);
      deferred = true;
    } catch (const std::exception&) {
      ++counters_.backend_errors;
      count_failure([&] { backend_.synchronize(); });
    }
  }
  if (deferred) {
    retiring_.push_back(retiring);
  } else {
    if (retiring.mapped_bytes) count_failure([&] { backend_.unmap(retiring.base, retiring.mapped_bytes); });
    count_failure([&] { backend_.unreserve(retiring.base, retiring.reserved_bytes); });
  }
  ++counters_.evictions;
  detach(mapping);
}

void MappingCache::detach(Mapping* mapping) {
  index_erase(mapping);
  lru_unlink(mapping);
  for (Chunk* c : mapping->chunks) {
    auto& list = c->mappings;
    list.erase(std::find(list.begin(), list.end(), mapping));
  }
  mappings_stat.decrease(1);
  mapped_bytes_stat.decrease(static_cast<std::int64_t>(mapping->reserved_bytes));
  const std::size_t index = mapping->index;
  mappings_[index] = std::move(mappings_.back());
  mappings_[index]->index = index;
  mappings_.pop_back();  // destroys `mapping`
}

void MappingCache::finish_retiring(bool wait) {
  if (retiring_.empty()) return;
  if (wait) count_failure([&] { backend_.synchronize(); });
  finish_completed(retiring_, wait, backend_, counters_.backend_errors, [&](const Retiring& r) {
    if (r.mapped_bytes) count_failure([&] { backend_.unmap(r.base, r.mapped_bytes); });
    count_failure([&] { backend_.unreserve(r.base, r.reserved_bytes); });
  });
}

Mapping* MappingCache::acquire_at(std::uintptr_t base, std::size_t chunks, StreamId stream) {
  for (auto& owned : mappings_) {
    Mapping* m = owned.get();
    if (m->base != base) continue;
    if (m->in_use || m->chunks.size() < chunks) return nullptr;
    for (std::size_t i = 0; i < chunks; ++i) {
      if (m->chunks[i]->busy) return nullptr;
    }
    use(m, chunks, stream);
    return m;
  }
  return nullptr;
}

void MappingCache::adopt_retiring(MappingCache& other) {
  retiring_.insert(retiring_.end(), other.retiring_.begin(), other.retiring_.end());
  other.retiring_.clear();
}

void MappingCache::unmap_all() {
  for (auto& m : mappings_) {
    if (!m->chunks.empty()) count_failure([&] { backend_.unmap(m->base, m->chunks.size() * kChunkSize); });
  }
  unmapped_ = true;
}

void MappingCache::map_all() {
  std::size_t done = 0;  // mappings mapped again so far
  try {
    for (; done < mappings_.size(); ++done) {
      Mapping* m = mappings_[done].get();
      std::size_t mapped = 0;
      try {
        while (mapped < m->chunks.size()) {
          const Chunk* head = m->chunks[mapped];
          backend_.map(m->base + mapped * kChunkSize, head->handle, head->handle_chunks * kChunkSize);
          mapped += head->handle_chunks;
        }
        if (mapped > 0) backend_.set_access(m->base, mapped * kChunkSize);
      } catch (...) {
        if (mapped > 0) count_failure([&] { backend_.unmap(m->base, mapped * kChunkSize); });
        throw;
      }
    }
  } catch (...) {
    for (std::size_t i = 0; i < done; ++i) {
      Mapping* m = mappings_[i].get();
      if (!m->chunks.empty()) count_failure([&] { backend_.unmap(m->base, m->chunks.size() * kChunkSize); });
    }
    throw;
  }
  unmapped_ = false;
}

void MappingCache::forget_streams() {
  progress_.forget();
  for (Chunk* c : pool_.all()) {
    if (!c->busy) c->stream = kNoStream;
  }
  std::vector<Mapping*> idle;
  idle.reserve(idle_.size());
  for (const ReadyKey& key : idle_) idle.push_back(key.mapping);
  idle_.clear();
  for (Mapping* m : idle) {
    m->indexed = false;
    index_insert(m, kNoStream);
  }
  for (auto& m : mappings_) {
    if (m->in_use) continue;
    m->last_stream = kNoStream;
    m->foreign_streams = false;  // its free chunks are all kNoStream now
  }
}

void MappingCache::evict_idle() {
  while (lru_head_ != nullptr) evict(lru_head_);
  finish_retiring(/*wait=*/false);
}

void MappingCache::truncate_in_use() {
  for (auto& m : mappings_) {
    if (!m->in_use) continue;
    // A handle unmaps only whole. No allocation ends inside one (Note [Large handles]);
    // should one, the handle it ends in stays mapped.
    std::size_t cut = m->used;
    while (cut < m->chunks.size() && !m->chunks[cut]->is_head()) ++cut;
    if (cut == m->chunks.size()) continue;
    const std::size_t tail = m->chunks.size() - cut;
    count_failure([&] { backend_.unmap(m->base + cut * kChunkSize, tail * kChunkSize); });
    for (std::size_t i = cut; i < m->chunks.size(); ++i) {
      Chunk* c = m->chunks[i];
      // Busy through another mapping: m counted it, and its release will no longer see m.
      if (c->busy) --m->busy_chunks;
      auto& list = c->mappings;
      list.erase(std::find(list.begin(), list.end(), m.get()));
    }
    m->chunks.resize(cut);
  }
}

void MappingCache::release_free_chunks() {
  std::vector<Chunk*> unmapped;  // heads of handles mapped nowhere, all of whose chunks are free
  for (Chunk* c : pool_.all()) {
    if (c->is_head() && c->mappings.empty() && !handle_blocks(c, nullptr)) unmapped.push_back(c);
  }
  for (Chunk* c : unmapped) count_failure([&] { pool_.release(c); });
}

std::vector<std::uintptr_t> MappingCache::addresses_of(std::uint64_t chunk_id) const {
  std::vector<std::uintptr_t> out;
  for (const auto& m : mappings_) {
    for (std::size_t i = 0; i < m->chunks.size(); ++i) {
      if (m->chunks[i]->id == chunk_id) out.push_back(m->base + i * kChunkSize);
    }
  }
  return out;
}

void MappingCache::index_insert(Mapping* mapping, StreamId stream) {
  const ReadyKey key{stream, mapping->chunks.size(), mapping->id, mapping};
  if (mapping->spare_node.empty()) {
    mapping->index_it = idle_.insert(key).first;
  } else {
    mapping->spare_node.value() = key;
    mapping->index_it = idle_.insert(std::move(mapping->spare_node)).position;
  }
  mapping->indexed = true;
}

void MappingCache::index_erase(Mapping* mapping) {
  if (!mapping->indexed) return;
  mapping->spare_node = idle_.extract(mapping->index_it);
  mapping->indexed = false;
}

std::size_t MappingCache::ready_count() const {
  std::size_t n = 0;
  for (const ReadyKey& key : idle_) n += key.mapping->busy_chunks == 0 ? 1 : 0;
  return n;
}

void MappingCache::lru_push(Mapping* mapping) {
  mapping->lru_prev = lru_tail_;
  mapping->lru_next = nullptr;
  if (lru_tail_)
    lru_tail_->lru_next = mapping;
  else
    lru_head_ = mapping;
  lru_tail_ = mapping;
  mapping->in_lru = true;
}

void MappingCache::lru_unlink(Mapping* mapping) {
  if (!mapping->in_lru) return;
  if (mapping->lru_prev)
    mapping->lru_prev->lru_next = mapping->lru_next;
  else
    lru_head_ = mapping->lru_next;
  if (mapping->lru_next)
    mapping->lru_next->lru_prev = mapping->lru_prev;
  else
    lru_tail_ = mapping->lru_prev;
  mapping->lru_prev = mapping->lru_next = nullptr;
  mapping->in_lru = false;
}

void MappingCache::append_stats(StatList& out) const {
  append_stat(out, "vmm.cached_mappings", mappings_stat);
  append_stat(out, "vmm.mapped_bytes", mapped_bytes_stat);
  out.emplace_back("vmm.ready_mappings", static_cast<std::int64_t>(ready_count()));
  out.emplace_back("vmm.retiring_mappings", static_cast<std::int64_t>(retiring_.size()));
  out.emplace_back("vmm.mapping_hits", counters_.hits);
  out.emplace_back("vmm.misses_no_candidate", counters_.misses_empty);
  out.emplace_back("vmm.misses_candidates_busy", counters_.misses_busy);
  out.emplace_back("vmm.stitches", counters_.stitches);
  out.emplace_back("vmm.stitched_bytes", counters_.stitched_bytes);
  out.emplace_back("vmm.stitched_handles", counters_.stitched_handles);
  out.emplace_back("vmm.fresh_mappings", counters_.fresh_mappings);
  out.emplace_back("vmm.mapping_evictions", counters_.evictions);
  out.emplace_back("vmm.cross_stream_waits", counters_.cross_stream_waits);
  out.emplace_back("vmm.cross_stream_fallbacks", counters_.cross_stream_fallbacks);
  out.emplace_back("vmm.prefix_reuses", counters_.prefix_reuses);
  out.emplace_back("vmm.repairs", counters_.repairs);
  out.emplace_back("vmm.repaired_chunks", counters_.repaired_chunks);
  out.emplace_back("vmm.repaired_handles", counters_.repaired_handles);
  out.emplace_back("vmm.progress_events", progress_.events_recorded);
  out.emplace_back("vmm.backend_errors", counters_.backend_errors);
  out.emplace_back("vmm.max_mapped_bytes", static_cast<std::int64_t>(max_mapped_bytes_));
}

}  // namespace vmm
