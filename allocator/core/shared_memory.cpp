#include "core/shared_memory.hpp"

#include <cstring>

namespace vmm {
namespace {

constexpr char kMagic[8] = {'v', 'm', 'm', 'a', 'l', 'l', 'o', 'c'};
constexpr std::uint32_t kFormatVersion = 2;
constexpr std::size_t kHeaderBytes = sizeof(kMagic) + 4 + 4 + 4 + 8 + 4;
// Far past any device (2^48 is 256 TiB): a larger size is a corrupt handle, refused before
// sums could wrap.
constexpr std::uint64_t kMaxSharedBytes = std::uint64_t{1} << 48;
constexpr std::size_t kPieceBytes = 4 + 8 + 8 + 8;

template <typename T>
void put(std::string& out, T value) {
  // Little-endian byte by byte, whatever the host's order.
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    out.push_back(static_cast<char>((static_cast<std::uint64_t>(value) >> (8 * i)) & 0xff));
  }
}

template <typename T>
T get(const std::string& in, std::size_t& at) {
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<std::uint64_t>(static_cast<unsigned char>(in[at + i])) << (8 * i);
  }
  at += sizeof(T);
  return static_cast<T>(value);
}

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("vmmalloc: cannot open a shared memory handle: " + what);
}

}  // namespace

std::size_t SharedDescription::bytes() const {
  std::size_t total = 0;
  for (const SharedPiece& p : pieces) total += p.bytes;
  return total;
}

std::string encode_shared(const SharedDescription& d) {
  std::string out(kMagic, sizeof(kMagic));
  put<std::uint32_t>(out, kFormatVersion);
  put<std::uint32_t>(out, d.kind == Backend::Kind::kCuda ? 0 : 1);
  put<std::int32_t>(out, d.pid);
  put<std::uint64_t>(out, d.start_time);
  put<std::uint32_t>(out, static_cast<std::uint32_t>(d.pieces.size()));
  for (const SharedPiece& p : d.pieces) {
    put<std::int32_t>(out, p.fd);
    put<std::uint64_t>(out, p.offset);
    put<std::uint64_t>(out, p.bytes);
    put<std::uint64_t>(out, p.serial);
  }
  return out;
}

bool is_vmmalloc_handle(const char* handle, std::size_t length) noexcept {
  return handle != nullptr && length >= sizeof(kMagic) && std::memcmp(handle, kMagic, sizeof(kMagic)) == 0;
}

SharedDescription decode_shared(const std::string& handle) {
  if (!is_vmmalloc_handle(handle)) bad("it was not written by vmmalloc");
  if (handle.size() < kHeaderBytes) bad("it is truncated (" + std::to_string(handle.size()) + " bytes)");
  std::size_t at = sizeof(kMagic);
  const auto version = get<std::uint32_t>(handle, at);
  if (version != kFormatVersion) {
    bad("it has format version " + std::to_string(version) + ", this vmmalloc reads version " +
        std::to_string(kFormatVersion) + " (run the same vmmalloc in both processes)");
  }
  const auto kind = get<std::uint32_t>(handle, at);
  if (kind > 1) bad("unknown backend kind " + std::to_string(kind));
  SharedDescription d;
  d.kind = kind == 0 ? Backend::Kind::kCuda : Backend::Kind::kHost;
  d.pid = get<std::int32_t>(handle, at);
  d.start_time = get<std::uint64_t>(handle, at);
  const auto count = get<std::uint32_t>(handle, at);
  if (count == 0) bad("it lists no memory");
  if (handle.size() != kHeaderBytes + std::size_t{count} * kPieceBytes) {
    bad("its length (" + std::to_string(handle.size()) + " bytes) does not match its " +
        std::to_string(count) + " pieces");
  }
  d.pieces.resize(count);
  std::uint64_t total = 0;
  for (SharedPiece& p : d.pieces) {
    p.fd = get<std::int32_t>(handle, at);
    p.offset = get<std::uint64_t>(handle, at);
    p.bytes = get<std::uint64_t>(handle, at);
    p.serial = get<std::uint64_t>(handle, at);
    if (p.fd < 0 || p.bytes == 0 || p.bytes % kChunkSize != 0 || p.offset % kChunkSize != 0) {
      bad("a piece is not whole 2 MiB chunks of an open descriptor");
    }
    if (p.bytes > kMaxSharedBytes || p.offset > kMaxSharedBytes) bad("a piece is larger than any device");
    total += p.bytes;
    if (total > kMaxSharedBytes) bad("it lists more memory than any device holds");
  }
  if (d.pid <= 0) bad("it names no process");
  return d;
}

}  // namespace vmm
