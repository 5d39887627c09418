// What a stitch, a repair or a page request must fill with physical chunks, and what it
// has filled so far (Note [Large handles] in chunk_pool.hpp).
//
// Note [Picking handles]
// A request is cut into spans: `large` spans of L chunks (one large handle, or L single
// chunks) and `single` spans of one chunk (a single chunk only). Candidates are offered in
// the caller's order of preference (Note [Growth slack]: free chunks no ready mapping
// needs, then growth, then chunks of ready mappings), each offer filling:
//   1. empty large spans with large handles, then large spans that single chunks fill only
//      in part (those singles go back to the offer: the span would otherwise wait for
//      growth while a handle that fits it is free),
//   2. single spans with single chunks,
//   3. large spans with the single chunks left (a span of singles costs L grants, but no
//      memory is created while free singles exist).
// So a request pays one grant per L chunks where large handles are free, and no request
// makes memory grow while free chunks it can use would serve it. A large handle never
// covers a single span: tried (the mapping then overruns the request by fewer than L
// chunks), it held those chunks unusable and peak reserved/allocated rose from 1.00 to
// 1.09 on the single-GPU loop's trace (bench/NOTES.md "Several GPUs" item 16).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/chunk_pool.hpp"

namespace vmm {

class PickPlan {
 public:
  // `large_chunks`: L, the chunks of a large handle (ignored when `large_spans` is 0).
  // Chunks taken get pick_mark = `mark`, so that a later offer can skip them.
  PickPlan(std::size_t large_spans, std::size_t single_spans, std::size_t large_chunks, std::uint64_t mark);

  // Takes what fills open spans from `heads` (heads of free large handles) and `singles`
  // (free single chunks), in that order, skipping those already taken (pick_mark).
  void offer(const std::vector<Chunk*>& heads, const std::vector<Chunk*>& singles);

  // Chunks still to fill (0: complete).
  std::size_t missing() const;
  // Fills every open span with new handles from `pool`: large spans with nothing in them
  // get a large handle, the rest single chunks. On a throw the handles it created are
  // released (failures to release counted in `failures`) and the plan is as before.
  void create_rest(ChunkPool& pool, std::int64_t& failures);
  // Gives back the handles create_rest made (a caller that fails later).
  void release_created(ChunkPool& pool, std::int64_t& failures) noexcept;
  // Forgets everything taken (a pick that gives up); chunks keep their marks.
  void clear();

  std::size_t large_spans() const { return large_.size(); }
  // Large spans a large handle offered now would fill: empty, or filled in part by singles.
  std::size_t open_large_spans() const;
  std::size_t single_spans() const { return single_.size(); }
  // The chunks filling large span i, in mapping order, and those of the single spans.
  const std::vector<Chunk*>& large_span(std::size_t i) const { return large_[i]; }
  const std::vector<Chunk*>& singles() const { return single_; }
  // Large spans, then single spans: the chunks of a stitched mapping, back to back.
  std::vector<Chunk*> layout() const;
  std::size_t created_chunks() const;
  // The pick_mark of the chunks it took.
  std::uint64_t mark() const { return mark_; }

 private:
  void take(Chunk* chunk);
  static bool holds_handle(const std::vector<Chunk*>& span);   // a large span's large handle
  bool filled_in_part(const std::vector<Chunk*>& span) const;  // by singles, not yet L
  std::size_t open_singles() const { return single_.size() - filled_singles_; }

  std::size_t large_chunks_;
  std::uint64_t mark_;
  std::vector<std::vector<Chunk*>> large_;  // each empty, a head's L chunks, or singles
  std::vector<Chunk*> single_;              // filled ones first; nullptr: open
  std::size_t filled_singles_ = 0;
  std::vector<Chunk*> created_;  // heads of handles create_rest made
};

}  // namespace vmm
