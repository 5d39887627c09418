// Virtual mappings of physical chunks: every large allocation and every small-pool segment
// is the prefix of one mapping. When no cached mapping fits a request, free chunks from
// anywhere are stitched into a fresh virtually contiguous range (GMLake) before physical
// memory grows past a small slack (Note [Growth slack]).
//
// Note [Mappings and readiness]
// A mapping is a reserved virtual range with chunks mapped back to back. One chunk can be
// mapped by several mappings at once (that is what stitching is). A mapping is
// - in use: an allocation holds its first `used` chunks (those chunks are busy);
// - idle: not in use. Idle mappings sit in an ordered index (stream, chunks, id) and on an
//   LRU list; past the bounds (count, virtual bytes) the least recently used are unmapped.
//   Unmapping never touches the chunks' physical memory, which may be live elsewhere;
// - ready: idle with busy_chunks == 0, so any prefix of it can be handed out with no
//   driver call. busy_chunks counts a mapping's busy chunks (through any mapping).
// Readiness is checked when the index is searched, not maintained in it: an allocation
// then costs one index update for its own mapping, however many other mappings share
// its chunks.
//
// Note [Growth slack]
// Stitching chunks that ready mappings need makes those mappings unusable while the new
// one lives, and the next request of their size must stitch in turn. So a stitch takes
// first the free chunks that feed no ready mapping, then, while physical memory stays
// within (1 + growth_slack) x allocated memory, creates chunks for the rest, and only
// beyond that breaks up ready mappings. Growth past the slack happens only once no free
// chunk is left, so reserved exceeds allocated by at most the slack plus the free space
// inside small segments.
//
// Note [Stream-ordered reuse]
// A chunk freed on stream S may still be read by work queued on S. Reuse on S itself is
// safe by stream order. Reuse on another stream T first makes T wait for an event
// recorded on S (GPU-side, the host does not block). A chunk whose stream is kNoStream is
// known idle (the device was synchronized). Likewise a mapping's virtual range may still
// be read by work on its last stream: evicting it records an event there and the range is
// unmapped only once that event completes (the driver does not wait: docs/FACTS.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <vector>

#include "backend/backend.hpp"
#include "core/chunk_pool.hpp"
#include "core/config.hpp"
#include "core/pick_plan.hpp"
#include "core/stats.hpp"
#include "core/stream_affinity.hpp"
#include "core/stream_progress.hpp"

namespace vmm {

struct Mapping;

struct ReadyKey {
  StreamId stream;
  std::size_t chunks;
  std::uint64_t id;
  Mapping* mapping;
  bool operator<(const ReadyKey& o) const {
    if (stream != o.stream) return stream < o.stream;
    if (chunks != o.chunks) return chunks < o.chunks;
    return id < o.id;
  }
};

struct Mapping {
  std::uintptr_t base = 0;
  std::size_t reserved_bytes = 0;  // virtual bytes reserved (>= mapped chunks)
  std::vector<Chunk*> chunks;      // mapped back to back from base
  std::uint64_t id = 0;
  std::size_t index = 0;  // position in MappingCache::mappings_
  std::size_t busy_chunks = 0;
  std::size_t used = 0;       // chunks held by the allocation while in use
  std::size_t requested = 0;  // bytes the allocation asked for (statistics)
  StreamId use_stream = 0;    // the allocation's stream while in use
  bool in_use = false;
  StreamId last_stream = kNoStream;
  std::uint64_t released = 0;  // number of its last release (Note [Stream progress])
  // Note [Foreign streams]: false only if every free chunk's stream is last_stream or
  // kNoStream, so that an idle mapping serves its index stream with no wait, unwalked.
  bool foreign_streams = false;
  bool indexed = false;  // in the idle index (== !in_use once created)
  std::set<ReadyKey>::iterator index_it;
  // The index node, kept while the mapping is out of the index, so that moving in and out
  // on every allocate/free allocates nothing.
  std::set<ReadyKey>::node_type spare_node;
  Mapping* lru_prev = nullptr;
  Mapping* lru_next = nullptr;
  bool in_lru = false;
};

// What a MappingCache counts (vmm.* statistics); only the cache writes them.
struct MappingCacheCounters {
  std::int64_t hits = 0;
  std::int64_t misses_empty = 0;  // no idle mapping of a fitting size
  // fitting idle mappings, all with chunks busy elsewhere (or, in the first pass of Note
  // [Streams before stitches], last used on another stream)
  std::int64_t misses_busy = 0;
  std::int64_t stitches = 0;
  std::int64_t stitched_bytes = 0;
  std::int64_t stitched_handles = 0;  // handles those stitches mapped (each one grant)
  std::int64_t fresh_mappings = 0;
  std::int64_t evictions = 0;
  std::int64_t cross_stream_waits = 0;
  // requests that found no memory of their own stream (or of an idle one), could not grow
  // within the slack, and so reused another stream's memory behind a wait
  std::int64_t cross_stream_fallbacks = 0;
  // Note [Repairing blocked mappings]: misses served by an idle mapping whose busy chunks
  // all lie past the request's prefix, and by one repaired in place (slots remapped)
  std::int64_t prefix_reuses = 0;
  std::int64_t repairs = 0;
  std::int64_t repaired_chunks = 0;
  std::int64_t repaired_handles = 0;  // handles mapped into repaired slots
  std::int64_t backend_errors = 0;    // failures on cleanup paths, counted not thrown
};

class MappingCache {
 public:
  MappingCache(Backend& backend, ChunkPool& pool, const Config& config);
  ~MappingCache();  // unmaps every mapping (process teardown; nothing may be in flight)
  MappingCache(const MappingCache&) = delete;
  MappingCache& operator=(const MappingCache&) = delete;

  // A mapping whose first `chunks` chunks are now busy and safe to use on `stream`.
  // Returns nullptr when that needs new physical chunks and !allow_create. Up to
  // `growth_budget` new chunks may be created rather than breaking up ready mappings
  // (Note [Growth slack]). Throws CapExceeded, DeviceOutOfMemory or BackendError; on a
  // throw nothing has changed.
  Mapping* acquire(std::size_t chunks, StreamId stream, bool allow_create, std::size_t growth_budget = 0);
  // The allocation on `mapping` is gone; its chunks were last used on `stream`.
  void release(Mapping* mapping, StreamId stream);
  // The idle mapping at `base`, its first `chunks` chunks now busy and used on `stream`
  // (checkpoint restores: Note [Private pools]); nullptr when there is none or those
  // chunks are busy. Throws only if a cross-stream wait fails.
  Mapping* acquire_at(std::uintptr_t base, std::size_t chunks, StreamId stream);

  // Note [Capture-safe mode]
  // While a private-pool route is active a CUDA graph may be capturing, and event queries,
  // event records on a capturing stream, waits on events from outside the capture and
  // synchronizations are illegal then (PyTorch defers them the same way). In this mode no
  // request waits for another stream's memory, no mapping is repaired (that needs the GPU's
  // progress) and none is evicted (that records an event); the evictions owed are made at
  // the first stitch after the mode ends. A stitch still follows Note [Growth slack], with
  // only memory that needs no wait (last used on the request's stream, or known idle):
  // free chunks no ready mapping needs, growth within the slack, chunks of ready mappings,
  // and then, since no later pass may wait for another stream's memory, growth past the
  // slack. Growing past the slack before taking chunks of ready mappings made a graph
  // tree's pool hold 1.023x its peak of allocated bytes on a training step's trace (2 MiB
  // chunks, replayed: bench/NOTES.md), this order 1.007x. The out-of-memory retry cannot run
  // during a capture, so growth within the slack that the cap or the device refuses is
  // tried again taking ready mappings' chunks first (acquire).
  void set_capture_safe(bool on) { capture_safe_ = on; }
  // Takes over the retiring ranges of `other` (a private pool's cache about to go), so
  // that they are unmapped here once the GPU is done with them.
  void adopt_retiring(MappingCache& other);

  // Note [Sleeping pools]: every range is unmapped, its address space kept; the caller made
  // sure the GPU is done with them. Failures are counted (backend_errors), not thrown.
  void unmap_all();
  // Maps every range again, to the chunks' current handles, and grants access. On a throw
  // nothing is mapped (still unmapped).
  void map_all();
  bool unmapped() const { return unmapped_; }

  // `n` chunks for pages of virtual tensors (Note [KV pages]), now busy and safe to use on
  // `stream`, picked as a stitch picks them (Note [Growth slack]). Empty when that needs
  // new chunks and !allow_create. Throws like acquire; on a throw nothing has changed.
  std::vector<Chunk*> take_chunks(std::size_t n, StreamId stream, bool allow_create,
                                  std::size_t growth_budget = 0);
  // Pages are gone (unmapped); their chunks were last used on `stream`.
  void return_chunks(const std::vector<Chunk*>& chunks, StreamId stream);

  // Slow paths, called with the device synchronized (Note [Stream-ordered reuse]).
  void forget_streams();
  void evict_idle();           // unmap every mapping not in use
  void truncate_in_use();      // unmap the chunks past each in-use mapping's prefix
  void release_free_chunks();  // give free chunks no mapping refers to back
  void finish_retiring(bool wait);

  // Calls f(base, bytes) for the mapped part of every mapping, in use or idle (retiring
  // ones are never used again and are left out).
  template <typename F>
  void for_each_mapped(F&& f) const {
    if (unmapped_) return;
    for (const auto& m : mappings_) {
      if (!m->chunks.empty()) f(m->base, m->chunks.size() * kChunkSize);
    }
  }

  std::size_t mapping_count() const { return mappings_.size(); }
  std::size_t ready_count() const;
  // Every address at which `chunk_id` is mapped (introspection and tests).
  std::vector<std::uintptr_t> addresses_of(std::uint64_t chunk_id) const;

  void append_stats(StatList& out) const;
  void reset_peak() {
    mappings_stat.reset_peak();
    mapped_bytes_stat.reset_peak();
  }

  Stat mappings_stat;
  Stat mapped_bytes_stat;
  // What the cache has done, reported as vmm.* statistics by append_stats.
  const MappingCacheCounters& counters() const { return counters_; }

 private:
  struct Retiring {
    std::uintptr_t base;
    std::size_t mapped_bytes;
    std::size_t reserved_bytes;
    EventId event;
  };

  // With `affinity`, only memory it reuses without a wait (Note [Streams before stitches]);
  // `count_miss` counts a miss in misses_busy / misses_empty.
  Mapping* find_ready(std::size_t chunks, StreamId stream, const StreamAffinity* affinity, bool count_miss);
  // The largest idle mapping a request of `chunks` may use a prefix of (reuse_ratio).
  std::size_t max_reuse_chunks(std::size_t chunks) const;
  Mapping* find_ready_in_groups(std::size_t chunks, StreamId stream, const StreamAffinity* affinity);
  Mapping* try_ready_group(std::size_t chunks, std::size_t max_chunks, StreamId stream,
                           const StreamAffinity* affinity);
  // Note [Repairing blocked mappings]: a fitting idle mapping of `stream` (or known idle)
  // whose first `chunks` chunks become usable by remapping at most a few of them; nullptr
  // when none is worth it, or the replacements need new chunks and !allow_create.
  Mapping* repair(std::size_t chunks, StreamId stream, bool allow_create, std::size_t growth_budget,
                  const StreamAffinity* affinity);
  // Slots to remap so that a request can use the first `chunks` of `mapping`: the whole
  // handle of every busy chunk and, with `affinity`, of every chunk that would need a wait
  // (a handle remaps only whole). Stops counting past `limit`.
  static std::size_t blocked_slots(const Mapping* mapping, std::size_t chunks, const StreamAffinity* affinity,
                                   std::size_t limit);
  // Whether a request cannot use `chunk` as it is: busy, or (with `affinity`) a wait.
  // The one test for blocked slots (repair) and for chunks a stitch may pick.
  static bool blocks_request(const Chunk* chunk, const StreamAffinity* affinity);
  // Whether the first `chunks` of `mapping` end inside a large handle (Note [Large handles]).
  static bool wastes_tail(const Mapping* mapping, std::size_t chunks);
  // blocks_request for any chunk of the handle `head` starts.
  static bool handle_blocks(const Chunk* head, const StreamAffinity* affinity);
  // A pick's plan for a request of `chunks` (Note [Picking handles]): as many large spans
  // as fit, the rest single spans.
  PickPlan stitch_plan(std::size_t chunks);
  // Whether the GPU is done with `mapping`'s range (idle), without blocking.
  bool last_use_finished(const Mapping* mapping);
  // Remaps the handles starting at `spans` (slots of the idle `mapping`) to the chunks
  // `plan` picked for them (free, not mapped by it): large spans in order from its large
  // spans, single ones from its singles. On a throw the mapping is gone (its range had
  // holes) and the caller rolls back.
  void remap_spans(Mapping* mapping, const std::vector<std::size_t>& spans, const PickPlan& plan);
  // Removes `mapping` from every list and index (its range is handled by the caller).
  void detach(Mapping* mapping);
  static bool reusable_without_wait(const Mapping* mapping, std::size_t chunks,
                                    const StreamAffinity& affinity);
  // With `affinity`, only chunks it reuses without a wait, and new chunks only within
  // `growth_budget`: nullptr when that does not cover the request.
  Mapping* stitch(std::size_t chunks, StreamId stream, bool allow_create, std::size_t growth_budget,
                  const StreamAffinity* affinity);
  // Fills `plan` with free chunks (when reuse_free) then new ones (Note [Picking
  // handles]); false, with nothing picked, when that needs new chunks and !allow_create
  // (or, with `affinity`, more than growth_budget of them). On a throw, the chunks it
  // created are released. Chunks mapped by `exclude` are never picked.
  bool pick_chunks(PickPlan& plan, bool reuse_free, bool allow_create, std::size_t growth_budget,
                   const StreamAffinity* affinity, const Mapping* exclude = nullptr);
  // Offers `plan` free handles of ready mappings until they cover what it misses, whole
  // mappings at a time, least recently released first (Note [Breaking ready mappings]);
  // with `affinity`, only handles it reuses without a wait.
  void take_from_ready(PickPlan& plan, const StreamAffinity* affinity, const Mapping* exclude);
  // Makes `stream` wait for the last streams of these chunks (Note [Stream-ordered reuse]).
  void wait_for_chunks(Chunk* const* chunks, std::size_t n, StreamId stream);
  void use(Mapping* mapping, std::size_t chunks, StreamId stream);
  Mapping* serve(std::size_t chunks, StreamId stream, bool allow_create, std::size_t growth_budget,
                 const StreamAffinity* affinity, bool count_miss);
  void evict(Mapping* mapping);
  void enforce_bounds();
  void index_insert(Mapping* mapping, StreamId stream);
  void index_erase(Mapping* mapping);
  static bool is_ready(const Mapping* m) { return m->indexed && m->busy_chunks == 0; }
  void lru_push(Mapping* mapping);
  void lru_unlink(Mapping* mapping);
  template <typename F>
  void count_failure(F&& cleanup) noexcept;

  MappingCacheCounters counters_;  // before progress_, which counts into it
  Backend& backend_;
  ChunkPool& pool_;
  const Config& config_;
  std::size_t max_mapped_bytes_;
  std::size_t large_chunks_;  // chunks of a large handle; 0: none (Note [Large handles])
  std::vector<std::unique_ptr<Mapping>> mappings_;
  std::set<ReadyKey> idle_;
  Mapping* lru_head_ = nullptr;  // least recently released
  Mapping* lru_tail_ = nullptr;
  std::vector<Retiring> retiring_;
  std::uint64_t next_id_ = 1;
  std::uint64_t pick_serial_ = 0;
  std::uint64_t releases_ = 0;  // releases so far (Note [Stream progress])
  StreamProgress progress_;
  int skipped_busy_ = 0;       // candidates skipped by the current find_ready
  bool capture_safe_ = false;  // Note [Capture-safe mode]
  bool unmapped_ = false;      // Note [Sleeping pools]
};

}  // namespace vmm
