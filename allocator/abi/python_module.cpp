// vmmalloc._C: a thin pybind11 layer over the C++ core. No policy lives here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <variant>
#include <vector>

#include "abi/device_registry.hpp"
#include "abi/dlpack_export.hpp"
#include "abi/shared_mapping.hpp"
#include "backend/backend.hpp"
#include "backend/cuda_backend.hpp"
#include "backend/cuda_driver.hpp"
#include "backend/fault_injection_backend.hpp"
#include "backend/host_backend.hpp"
#include "backend/host_pinning.hpp"
#include "core/caching_allocator.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/hot_path_timing.hpp"
#include "core/virtual_range.hpp"

namespace py = pybind11;
using namespace vmm;

namespace {

// A whole number in [0, 2**64) from Python, or a ValueError that names the argument: core
// API misuse reads as what it is, not as pybind11's "incompatible function arguments".
std::uint64_t whole(py::handle value, const char* what) {
  const auto bad = [&] {
    return py::value_error(std::string(what) + " must be a whole number in [0, 2**64), got " +
                           py::repr(value).cast<std::string>());
  };
  if (PyBool_Check(value.ptr()) || PyFloat_Check(value.ptr())) throw bad();
  PyObject* index = PyNumber_Index(value.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw bad();
  }
  const unsigned long long out = PyLong_AsUnsignedLongLong(index);
  Py_DECREF(index);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw bad();
  }
  return out;
}

py::dict to_dict(const StatList& stats) {
  py::dict out;
  for (const auto& [key, value] : stats) out[py::str(key)] = value;
  return out;
}

py::object config_value(const ConfigValue& value) {
  return std::visit([](const auto& v) -> py::object { return py::cast(v); }, value);
}

py::dict config_to_dict(const Config& c) {
  py::dict out;
  for (const ConfigKey& key : config_key_table()) out[key.name] = config_value(key.get(c));
  return out;
}

// The DLPack export of a VirtualRange keeps its Python handle alive (manager_ctx holds a
// reference) so the reserved range outlives every torch tensor viewing it.
struct Export {
  dlpack::ManagedTensor managed;
  std::int64_t shape[1];
};

void release_export(dlpack::ManagedTensor* self) {
  Export* e = reinterpret_cast<Export*>(self);
  PyGILState_STATE gil = PyGILState_Ensure();
  auto* handle = static_cast<PyObject*>(self->manager_ctx);
  try {
    py::handle(handle).cast<VirtualRange&>().remove_export();
  } catch (const std::exception&) {
    // Releasing never throws into torch's deleter; the range then stays reserved.
  }
  Py_XDECREF(handle);
  PyGILState_Release(gil);
  delete e;
}

void capsule_destructor(PyObject* capsule) {
  // Only an export nobody consumed is still ours to release.
  if (!PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) return;
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}

py::capsule export_dlpack(py::object handle, VirtualRange& vt) {
  const Backend& backend = vt.backend();
  vt.add_export();  // throws for a freed handle
  auto* e = new Export{};
  e->shape[0] = static_cast<std::int64_t>(vt.bytes());
  dlpack::Tensor& t = e->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(vt.address());
  const bool cuda = backend.kind() == Backend::Kind::kCuda;
  t.device = {cuda ? dlpack::kCUDA : dlpack::kCPU, cuda ? backend.device() : 0};
  t.ndim = 1;
  t.dtype = {1, 8, 1};
  t.shape = e->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  e->managed.manager_ctx = handle.release().ptr();
  e->managed.deleter = release_export;
  PyObject* capsule = PyCapsule_New(&e->managed, dlpack::kCapsuleName, capsule_destructor);
  if (capsule == nullptr) {
    release_export(&e->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vmmalloc's C++ core: chunk pool, stitching caching allocator, backends.";
  m.attr("CHUNK_SIZE") = kChunkSize;
  m.attr("SMALL_REQUEST_LIMIT") = kSmallRequestLimit;

  static py::exception<BackendError> backend_error(m, "BackendError", PyExc_RuntimeError);
  static py::handle oom_type = [&] {
    py::object type = py::reinterpret_steal<py::object>(PyErr_NewExceptionWithDoc(
        "vmmalloc._C.OutOfMemoryError",
        "The allocator could not serve a request after releasing its caches and retrying. "
        "`stats` holds the allocator statistics at the moment of failure.",
        PyExc_MemoryError, nullptr));
    m.attr("OutOfMemoryError") = type;
    return type.release();
  }();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemoryError& e) {
      py::object exc = py::reinterpret_borrow<py::object>(oom_type)(e.what());
      exc.attr("stats") = to_dict(e.stats());
      exc.attr("requested_bytes") = e.requested();
      PyErr_SetObject(oom_type.ptr(), exc.ptr());
    } catch (const BackendError& e) {
      py::set_error(backend_error, e.what());
    }
  });

  m.def(
      "parse_config", [](const std::string& text) { return config_to_dict(parse_config(text)); },
      py::arg("text"),
      "Validates a VMMALLOC_CONF string ('key:value,...') and returns the options as a "
      "dict. Raises ValueError naming a bad key or value.");
  m.def(
      "pin_host_memory",
      [](std::uintptr_t address, std::size_t bytes, int device) {
        return pin_host_memory(reinterpret_cast<void*>(address), bytes, device);
      },
      py::arg("address"), py::arg("bytes"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Page-locks host memory for fast asynchronous copies with every GPU. Returns '' on "
      "success, else why it was not pinned (nothing is pinned then).");
  m.def(
      "unpin_host_memory",
      [](std::uintptr_t address, int device) {
        return unpin_host_memory(reinterpret_cast<void*>(address), device);
      },
      py::arg("address"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "Undoes pin_host_memory; returns '' or the error.");
  m.def(
      "config_key_table",
      [] {
        py::list out;
        const Config defaults;
        for (const ConfigKey& key : config_key_table()) {
          out.append(py::make_tuple(key.name, key.allowed, config_value(key.get(defaults))));
        }
        return out;
      },
      "(key, allowed values, default) for every VMMALLOC_CONF key, in the docs' order.");
  m.def("parse_bytes", &parse_bytes, py::arg("text"), py::arg("what") = "",
        "A byte count by vmmalloc's one rule (allocator/core/config.hpp); ValueError naming `what`.");
  m.def(
      "cuda_unavailable_reason", [] { return cu::driver_unavailable_reason(); },
      "Empty when the CUDA driver loaded and initialized (cuInit); otherwise why the cuda "
      "backend cannot run.");
  m.def(
      "cuda_library_reason", [] { return cu::driver_library_reason(); },
      "Empty when the CUDA driver library and its entry points were found; otherwise why "
      "not. Never initializes CUDA.");

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend", "Where chunks live: host (memfd) or cuda.")
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("device", &Backend::device)
      .def_property_readonly("total_memory", &Backend::total_memory)
      .def_property_readonly("free_memory", &Backend::free_memory)
      .def("synchronize", &Backend::synchronize)
      .def("peers", &Backend::peers,
           "Other devices granted access to this device's memory (Note [Peer access]).")
      .def(
          "write",
          [](Backend& b, std::uintptr_t addr, py::bytes data) {
            const std::string s = data;
            b.copy_from_host(addr, s.data(), s.size());
          },
          py::arg("address"), py::arg("data"), "Copies bytes from the host to mapped memory at `address`.")
      .def(
          "read",
          [](Backend& b, std::uintptr_t addr, std::size_t n) {
            std::string s(n, '\0');
            b.copy_to_host(s.data(), addr, n);
            return py::bytes(s);
          },
          py::arg("address"), py::arg("size"),
          "Copies `size` bytes of mapped memory at `address` to the host.");

  py::class_<HostBackend, Backend, std::shared_ptr<HostBackend>>(
      m, "HostBackend", "CUDA VMM semantics on CPU memory (memfd chunks, mmap mappings).")
      .def(py::init<std::size_t, int>(), py::arg("capacity"), py::arg("device") = 0)
      .def("peer_granted_bytes", &HostBackend::peer_granted_bytes, py::arg("peer"),
           "Bytes granted to device `peer` so far (peers are bookkeeping on the host).");

  py::class_<CudaBackend, Backend, std::shared_ptr<CudaBackend>>(
      m, "CudaBackend", "The CUDA driver's virtual memory API on one device.")
      .def(py::init<int, bool>(), py::arg("device"), py::arg("shareable") = true)
      .def_property_readonly("shareable", &CudaBackend::shareable,
                             "Whether chunks created from now on can be shared with other processes.");

  py::class_<CachingAllocator>(m, "Allocator", "The stitching caching allocator of one device.")
      .def(py::init([](std::shared_ptr<Backend> backend, const std::string& conf) {
             return std::make_unique<CachingAllocator>(std::move(backend), parse_config(conf));
           }),
           py::arg("backend"), py::arg("conf") = "", py::keep_alive<1, 2>())
      .def(
          "allocate",
          [](CachingAllocator& a, py::handle size, py::handle stream) -> std::uintptr_t {
            const std::uint64_t bytes = whole(size, "allocate: size");
            const std::uint64_t s = whole(stream, "allocate: stream");
            if (bytes == 0) return 0;  // as PyTorch's allocator: no memory for 0 bytes
            py::gil_scoped_release release;
            return a.allocate(bytes, s);
          },
          py::arg("size"), py::arg("stream") = 0,
          "A block of `size` bytes for work on `stream`; 0 for 0 bytes, as PyTorch's "
          "allocator gives. Raises OutOfMemoryError after the retry.")
      .def(
          "deallocate",
          [](CachingAllocator& a, py::handle ptr) {
            const std::uint64_t address = whole(ptr, "deallocate: ptr");
            if (address == 0) return;  // freeing 0 (a 0-byte block) does nothing
            py::gil_scoped_release release;
            a.deallocate(address);
          },
          py::arg("ptr"))
      .def(
          "record_stream",
          [](CachingAllocator& a, py::handle ptr, py::handle stream) {
            a.record_stream(whole(ptr, "record_stream: ptr"), whole(stream, "record_stream: stream"));
          },
          py::arg("ptr"), py::arg("stream"))
      .def("empty_cache", &CachingAllocator::empty_cache, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const CachingAllocator& a) { return to_dict(a.stats()); })
      .def("reset_peak_stats", &CachingAllocator::reset_peak_stats)
      .def("reset_accumulated_stats", &CachingAllocator::reset_accumulated_stats)
      .def(
          "set_memory_cap",
          [](CachingAllocator& a, py::handle bytes) {
            a.set_memory_cap(whole(bytes, "set_memory_cap: bytes"));
          },
          py::arg("bytes"))
      .def("set_memory_fraction", &CachingAllocator::set_memory_fraction, py::arg("fraction"),
           "Caps physical memory at `fraction` in [0, 1] of the device's memory (0: nothing new).")
      .def_property_readonly("memory_cap", &CachingAllocator::memory_cap)
      .def_property_readonly("memory_fraction", &CachingAllocator::memory_fraction,
                             "The fraction set last, or the cap over the device's memory.")
      .def_property_readonly("backend", &CachingAllocator::shared_backend)
      .def(
          "allocation_size",
          [](const CachingAllocator& a, py::handle ptr) {
            return a.allocation_size(whole(ptr, "allocation_size: ptr"));
          },
          py::arg("ptr"))
      .def(
          "owns", [](const CachingAllocator& a, py::handle ptr) { return a.owns(whole(ptr, "owns: ptr")); },
          py::arg("ptr"), "Whether `ptr` is the start of a live allocation of this allocator.")
      .def("chunk_ids", &CachingAllocator::chunk_ids, py::arg("ptr"))
      .def(
          "share",
          [](CachingAllocator& a, py::handle ptr) {
            std::size_t offset = 0;
            const std::string handle = share_handle(a, whole(ptr, "share: ptr"), &offset);
            return py::make_tuple(py::bytes(handle), offset);
          },
          py::arg("ptr"),
          "(handle, offset): the live allocation at `ptr` described for another process, "
          "and ptr's offset in the range the handle maps (Note [Sharing memory between "
          "processes]); open it there with SharedMemory.")
      .def("chunk_addresses", &CachingAllocator::chunk_addresses, py::arg("chunk_id"))
      .def("add_peer", &CachingAllocator::add_peer, py::arg("peer"), py::call_guard<py::gil_scoped_release>(),
           "Grants device `peer` access to this device's memory, mapped so far and from now "
           "on; False when there is no peer path (or it was granted already).")
      .def("record_events", &CachingAllocator::record_events, py::arg("capacity"),
           "Keeps the last `capacity` allocator events from now on (0 turns recording off); "
           "the events kept so far are forgotten.")
      .def_property_readonly("event_capacity", &CachingAllocator::event_capacity)
      .def_property_readonly("events_dropped", &CachingAllocator::events_dropped,
                             "Events overwritten since recording was turned on.")
      .def(
          "events",
          [](const CachingAllocator& a) {
            const std::vector<MemoryEvent> events = a.events();
            py::list out(events.size());
            for (std::size_t i = 0; i < events.size(); ++i) {
              const MemoryEvent& e = events[i];
              out[i] = py::make_tuple(event_kind_name(e.kind), e.time_ns, e.addr, e.size, e.aux, e.allocated,
                                      e.reserved, e.stream);
            }
            return out;
          },
          "The kept events, oldest first, as tuples (kind, time_ns, addr, size, aux, "
          "allocated_after, reserved_after, stream).")
      .def(
          "create_or_incref_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            a.create_or_incref_pool({id.first, id.second});
          },
          py::arg("pool"),
          "Creates private pool `pool` (use count 1) or adds 1 to its use count "
          "(Note [Private pools]).")
      .def(
          "begin_allocate_to_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id,
             std::optional<std::vector<StreamId>> streams, bool this_thread) {
            if (streams.has_value() == this_thread) {
              throw std::invalid_argument(
                  "begin_allocate_to_pool: give streams or this_thread=True, one of them");
            }
            StreamFilter filter;
            if (this_thread) {
              filter = [thread = std::this_thread::get_id()](StreamId) {
                return std::this_thread::get_id() == thread;
              };
            } else {
              filter = [set = *streams](StreamId s) {
                return std::find(set.begin(), set.end(), s) != set.end();
              };
            }
            a.begin_allocate_to_pool({id.first, id.second}, std::move(filter));
          },
          py::arg("pool"), py::arg("streams") = py::none(), py::arg("this_thread") = false,
          "Routes requests on `streams` (as a capture does), or from the calling thread (as "
          "use_mem_pool does), to private pool `pool`; adds 1 to its use count.")
      .def(
          "end_allocate_to_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            a.end_allocate_to_pool({id.first, id.second});
          },
          py::arg("pool"))
      .def(
          "release_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            a.release_pool({id.first, id.second});
          },
          py::arg("pool"), py::call_guard<py::gil_scoped_release>(),
          "Takes 1 from the pool's use count; at 0 its memory joins the main arena once "
          "nothing in it is live.")
      .def(
          "pool_use_count",
          [](const CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            return a.pool_use_count({id.first, id.second});
          },
          py::arg("pool"))
      .def_property_readonly("routes_active", &CachingAllocator::routes_active)
      .def(
          "pool_allocations",
          [](const CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            py::list out;
            for (const LiveBlock& b : a.pool_allocations({id.first, id.second})) {
              out.append(py::make_tuple(b.ptr, b.size, b.requested, b.stream));
            }
            return out;
          },
          py::arg("pool"), "The pool's live allocations as (ptr, size, requested, stream), by address.")
      .def(
          "restore_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id,
             const std::vector<std::tuple<std::uintptr_t, std::size_t, std::size_t, StreamId>>& blocks) {
            std::vector<LiveBlock> wanted;
            for (const auto& [ptr, size, requested, stream] : blocks) {
              wanted.push_back({ptr, size, requested, stream});
            }
            return a.restore_pool({id.first, id.second}, wanted);
          },
          py::arg("pool"), py::arg("blocks"),
          "Frees every live allocation of the pool (returned) and allocates exactly `blocks` "
          "(as pool_allocations gives them).")
      .def(
          "pause_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id, bool backup) {
            a.pause_pool({id.first, id.second}, backup);
          },
          py::arg("pool"), py::arg("backup") = true, py::call_guard<py::gil_scoped_release>(),
          "Gives the pool's physical memory back, keeping its addresses (Note [Sleeping "
          "pools]); with backup, its live contents are kept on the host.")
      .def(
          "resume_pool",
          [](CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            a.resume_pool({id.first, id.second});
          },
          py::arg("pool"), py::call_guard<py::gil_scoped_release>(),
          "Maps new memory at the paused pool's addresses and restores its backups.")
      .def(
          "pool_paused",
          [](const CachingAllocator& a, std::pair<std::uint64_t, std::uint64_t> id) {
            return a.pool_paused({id.first, id.second});
          },
          py::arg("pool"))
      .def(
          "segments",
          [](const CachingAllocator& a) {
            static const char* const kinds[] = {"large", "small", "pages", "free"};
            static const char* const states[] = {"active_allocated", "active_pending_free", "inactive"};
            py::list out;
            for (const SnapshotSegment& s : a.segments()) {
              py::list blocks;
              for (const SnapshotBlock& b : s.blocks) {
                py::dict block;
                block["address"] = b.addr;
                block["size"] = b.size;
                block["requested_size"] = b.requested;
                block["state"] = states[static_cast<int>(b.state)];
                blocks.append(block);
              }
              py::dict segment;
              segment["address"] = s.base;
              segment["total_size"] = s.bytes;
              segment["stream"] = s.stream;
              segment["kind"] = kinds[static_cast<int>(s.kind)];
              segment["pool"] = py::make_tuple(s.pool.first, s.pool.second);
              segment["blocks"] = blocks;
              out.append(segment);
            }
            return out;
          },
          "The regions memory is in now, with their blocks (Note [Snapshot segments]).");

  py::class_<VirtualRange>(m, "VirtualRange",
                           "Reserved virtual memory of an allocator whose 2 MiB pages are "
                           "mapped only where committed (the memory under virtual tensors).")
      .def(py::init([](CachingAllocator& allocator, py::handle bytes, py::handle filler_kind) {
             const std::size_t kind = whole(filler_kind, "VirtualRange: filler_kind");
             if (kind > std::numeric_limits<std::uint32_t>::max()) {
               throw py::value_error("VirtualRange: filler_kind must be in [0, 2**32), got " +
                                     std::to_string(kind));
             }
             return std::make_unique<VirtualRange>(allocator, whole(bytes, "VirtualRange: bytes"),
                                                   static_cast<std::uint32_t>(kind));
           }),
           py::arg("allocator"), py::arg("bytes"), py::arg("filler_kind") = 0, py::keep_alive<1, 2>(),
           "filler_kind: ranges of one kind (one element type) share the chunk their padding "
           "pages map (Note [Padding pages]).")
      .def_property_readonly("address", &VirtualRange::address)
      .def_property_readonly("bytes", &VirtualRange::bytes)
      .def_property_readonly("freed", &VirtualRange::freed)
      .def_property_readonly("live_bytes", &VirtualRange::live_bytes)
      .def("live_pages", &VirtualRange::live_pages, "Indices of the 2 MiB pages now mapped and in use.")
      .def(
          "commit",
          [](VirtualRange& vt, py::handle rows, py::handle stride, py::handle begin, py::handle end,
             py::handle stream, py::object row_begins) {
            std::vector<std::size_t> begins;
            if (!row_begins.is_none()) {
              for (py::handle b : row_begins) begins.push_back(whole(b, "commit: row_begins[r]"));
            }
            vt.commit(whole(rows, "commit: rows"), whole(stride, "commit: stride"),
                      whole(begin, "commit: begin"), whole(end, "commit: end"),
                      whole(stream, "commit: stream"), begins);
          },
          py::arg("rows"), py::arg("stride"), py::arg("begin"), py::arg("end"), py::arg("stream") = 0,
          py::arg("row_begins") = py::none(),
          "Maps exactly the pages overlapping [r*stride + begin, r*stride + end) for r < "
          "rows; the others are unmapped once the work queued on `stream` is done. With "
          "row_begins (a byte offset per row), pages holding only row r's bytes before "
          "row_begins[r] map the filler chunk of the range's kind (Note [Padding pages]).")
      .def("free", &VirtualRange::free, py::arg("stream") = 0,
           "Gives every page back after the work queued on `stream`; the range is unusable "
           "afterwards (exported tensors keep the address space reserved, never mapped).")
      .def_property_readonly("exports", &VirtualRange::exports, "Exported tensors (DLPack) still alive.")
      .def(
          "dlpack", [](py::object self) { return export_dlpack(self, self.cast<VirtualRange&>()); },
          "A DLPack capsule of the whole range as a 1-D uint8 tensor (torch.from_dlpack).");

  py::class_<SharedMapping, std::shared_ptr<SharedMapping>>(
      m, "SharedMemory", "Memory another process shared (Allocator.share), mapped into this one.")
      .def(py::init([](std::shared_ptr<Backend> backend, const py::bytes& handle) {
             const SharedDescription description = decode_shared(handle);
             py::gil_scoped_release release;
             return std::make_shared<SharedMapping>(std::move(backend), description);
           }),
           py::arg("backend"), py::arg("handle"))
      .def_property_readonly("base", &SharedMapping::base)
      .def_property_readonly("bytes", &SharedMapping::bytes);
  m.def(
      "is_shared_handle",
      [](const py::bytes& handle) {
        const std::string text = handle;
        return is_vmmalloc_handle(text);
      },
      py::arg("handle"), "Whether a handle was written by vmmalloc (Allocator.share), in any process.");
  m.def(
      "decode_shared_handle",
      [](const py::bytes& handle) {
        const SharedDescription d = decode_shared(handle);
        py::list pieces;
        for (const SharedPiece& p : d.pieces) {
          py::dict piece;
          piece["fd"] = p.fd;
          piece["offset"] = p.offset;
          piece["bytes"] = p.bytes;
          piece["serial"] = p.serial;
          pieces.append(piece);
        }
        py::dict out;
        out["pid"] = d.pid;
        out["start_time"] = d.start_time;
        out["backend"] = d.kind == Backend::Kind::kCuda ? "cuda" : "host";
        out["pieces"] = pieces;
        return out;
      },
      py::arg("handle"), "What a shared memory handle lists (ValueError for one that is not vmmalloc's).");

  // The process-wide allocators that torch's pluggable allocator reaches (one per device).
  m.def(
      "configure", [](const std::string& conf) { DeviceRegistry::instance().configure(conf); },
      py::arg("conf"),
      "Sets the options (VMMALLOC_CONF syntax) of the per-device allocators torch uses. "
      "Raises ValueError for a bad string, RuntimeError once memory was allocated with "
      "other options.");
  m.def("configured", [] { return DeviceRegistry::instance().conf_text(); });
  m.def(
      "device_allocator",
      [](int device) -> CachingAllocator& { return DeviceRegistry::instance().device(device); },
      py::arg("device"), py::return_value_policy::reference,
      "The allocator torch uses on `device` (created on first use).");
  m.def(
      "device_allocator_exists",
      [](int device) { return DeviceRegistry::instance().existing(device) != nullptr; }, py::arg("device"));
  // What tests and benchmarks drive the core with; not part of the API.
  py::module_ testing = m.def_submodule(
      "testing", "Fault injection, device-registry control and C++-timed loops, for tests and benchmarks.");
  py::class_<FaultInjectionBackend, Backend, std::shared_ptr<FaultInjectionBackend>>(
      testing, "FaultInjectionBackend", "Forwards to a backend and fails chosen calls on demand.")
      .def(py::init<std::shared_ptr<Backend>>(), py::arg("inner"))
      .def(
          "fail",
          [](FaultInjectionBackend& b, const std::string& op, int skip, int count) {
            b.fail(parse_backend_op(op), skip, count);
          },
          py::arg("op"), py::arg("skip") = 0, py::arg("count") = 1,
          "After `skip` more successful calls of `op` (reserve, create_chunk, map, "
          "set_access), fail the next `count`.")
      .def(
          "calls",
          [](const FaultInjectionBackend& b, const std::string& op) { return b.calls(parse_backend_op(op)); },
          py::arg("op"))
      .def("hold_events", &FaultInjectionBackend::hold_events,
           "Events recorded from now on stay in flight until release_events() or "
           "synchronize(): simulates stream work that has not finished.")
      .def("release_events", &FaultInjectionBackend::release_events);

  testing.def(
      "use_host_backend_for_devices",
      [](std::size_t capacity) {
        DeviceRegistry::instance().set_backend_factory(
            [capacity](int device) { return std::make_shared<HostBackend>(capacity, device); });
      },
      py::arg("capacity"),
      "Tests and demos without a GPU: per-device allocators created from now on use the "
      "host backend.");
  testing.def(
      "reset_devices_for_tests", [] { DeviceRegistry::instance().reset_for_tests(); },
      "Drops every per-device allocator (only with nothing allocated).");
  testing.def("time_alloc_free_pairs", &time_alloc_free_pairs, py::arg("allocator"), py::arg("sizes"),
              py::arg("rounds"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
              "Nanoseconds per cached allocate+deallocate pair, timed in C++.");
  testing.def("time_malloc_free_pairs", &time_malloc_free_pairs, py::arg("sizes"), py::arg("rounds"),
              py::call_guard<py::gil_scoped_release>(),
              "Nanoseconds per malloc+free pair of the C library, timed in C++ (the peer).");
}
