// Shared helpers for the model-file tests.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace micromix::test {

inline std::string data_dir() { return std::string(MICROMIX_SOURCE_DIR) + "/tests/data/gguf"; }

inline std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::string read_text(const std::string& path) {
  auto b = read_bytes(path);
  return std::string(b.begin(), b.end());
}

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoll(v, nullptr, 10) : fallback;
}

// Random structural mutation of a byte image: bit flips, byte overwrites with
// boundary values, 2/4/8-byte integer overwrites, insertions, deletions, truncation
// and block copies. `hot` bytes at the front (headers) are mutated more often.
inline std::vector<uint8_t> mutate(const std::vector<uint8_t>& in, std::mt19937_64& rng, size_t hot) {
  std::vector<uint8_t> b = in;
  auto pick = [&](size_t n) -> size_t { return n ? static_cast<size_t>(rng() % n) : 0; };
  auto pos = [&]() -> size_t {
    if (b.empty()) return 0;
    if (hot && hot < b.size() && rng() % 4 != 0) return pick(hot);
    return pick(b.size());
  };
  static const uint64_t interesting[] = {0,          1,          2,          3,          7,
                                         8,          31,         32,         63,         64,
                                         0x7F,       0x80,       0xFF,       0x100,      0x7FFF,
                                         0xFFFF,     0x7FFFFFFF, 0xFFFFFFFF, 1ull << 32, 0x7FFFFFFFFFFFFFFFull,
                                         0x8000000000000000ull, ~0ull};
  const int n_mut = 1 + static_cast<int>(rng() % 4);
  for (int m = 0; m < n_mut; ++m) {
    switch (rng() % 8) {
      case 0:
      case 1:
        if (!b.empty()) b[pos()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 2:
        if (!b.empty()) b[pos()] = static_cast<uint8_t>(interesting[pick(std::size(interesting))]);
        break;
      case 3: {
        const size_t width = size_t{1} << (1 + rng() % 3);
        if (b.size() < width) break;
        size_t p = pos();
        if (p + width > b.size()) p = b.size() - width;
        uint64_t v = interesting[pick(std::size(interesting))];
        if (rng() % 2) v += static_cast<uint64_t>(static_cast<int64_t>(rng() % 33) - 16);
        std::memcpy(&b[p], &v, width);
        break;
      }
      case 4: {
        const size_t p = b.empty() ? 0 : pos();
        const size_t n = 1 + pick(8);
        std::vector<uint8_t> ins(n);
        for (auto& c : ins) c = static_cast<uint8_t>(rng());
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(std::min(p, b.size())), ins.begin(), ins.end());
        break;
      }
      case 5: {
        if (b.empty()) break;
        const size_t p = pos();
        const size_t n = std::min(b.size() - p, 1 + pick(8));
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(p), b.begin() + static_cast<std::ptrdiff_t>(p + n));
        break;
      }
      case 6:
        if (!b.empty()) b.resize(pick(b.size()));
        break;
      case 7: {
        if (b.size() < 16) break;
        const size_t n = 1 + pick(16);
        const size_t src = pick(b.size() - n), dst = pick(b.size() - n);
        std::memmove(&b[dst], &b[src], n);
        break;
      }
    }
  }
  return b;
}

}  // namespace micromix::test
