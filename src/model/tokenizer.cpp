// Byte-level BPE and SentencePiece-style BPE tokenizers (see tokenizer.h).
#include "micromix/model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <functional>
#include <optional>
#include <queue>
#include <string>
#include <unordered_map>

namespace micromix::model {

// ---------------------------------------------------------------------------------------
// UTF-8 helpers
// ---------------------------------------------------------------------------------------
namespace unicode {

int utf8_decode(std::string_view s, size_t i, uint32_t& cp) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  cp = 0xFFFFFFFFu;
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  int len;
  uint32_t v;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2;
    v = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3;
    v = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4;
    v = b0 & 0x07;
  } else {
    return 1;
  }
  if (i + len > s.size()) return 1;
  for (int k = 1; k < len; ++k) {
    const auto b = static_cast<uint8_t>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 1;
    v = (v << 6) | (b & 0x3F);
  }
  // Reject overlong forms, surrogates and values beyond U+10FFFF.
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < kMin[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 1;
  cp = v;
  return len;
}

size_t utf8_complete_prefix(std::string_view s) {
  // Look back at most 3 bytes for the lead byte of a sequence the string cuts short.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto b = static_cast<uint8_t>(s[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking
    const size_t need = (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace unicode

namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581 "▁"

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// GPT-2's reversible byte -> code point mapping (printable bytes map to themselves).
std::array<uint32_t, 256> byte_to_code_point() {
  std::array<uint32_t, 256> map{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
  return map;
}

enum class CharClass : uint8_t { Letter, Number, Space, Other };

CharClass classify(uint32_t cp) {
  if (unicode::is_letter(cp)) return CharClass::Letter;
  if (unicode::is_number(cp)) return CharClass::Number;
  if (unicode::is_whitespace(cp)) return CharClass::Space;
  return CharClass::Other;
}

struct Char {
  uint32_t cp;
  uint32_t offset;  // byte offset in the text
  CharClass cls;
};

// The GPT-2 split pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// applied to chars[begin, end); emits [first char, last char) index ranges.
template <typename Emit>
void split_gpt2(const std::vector<Char>& c, size_t begin, size_t end, Emit&& emit) {
  size_t i = begin;
  while (i < end) {
    // Contractions.
    if (c[i].cp == '\'' && i + 1 < end) {
      const uint32_t c1 = c[i + 1].cp;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < end) {
        const uint32_t c2 = c[i + 2].cp;
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    size_t j = i;
    if (c[i].cp == ' ' && i + 1 < end && c[i + 1].cls != CharClass::Space) j = i + 1;
    const CharClass cls = c[j].cls;
    if (cls != CharClass::Space) {
      size_t k = j + 1;
      while (k < end && c[k].cls == cls) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    // Whitespace: a run that is not followed by a non-space keeps its last character for
    // the next piece (\s+(?!\S)), unless the run is a single character (\s+).
    size_t k = i + 1;
    while (k < end && c[k].cls == CharClass::Space) ++k;
    if (k < end && k - i >= 2) --k;
    emit(i, k);
    i = k;
  }
}

struct Symbol {
  int32_t id;     // token id, -1 while the text has no token (SentencePiece fallback)
  int32_t prev, next;
  uint32_t start, end;  // byte range in the text the symbol covers
};

struct Candidate {
  double priority;  // lower merges first
  int32_t left, right;
  uint32_t left_end, right_end;
  int32_t id;
  bool operator<(const Candidate& o) const {  // for std::priority_queue (max-heap)
    if (priority != o.priority) return priority > o.priority;
    return left > o.left;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------
struct Tokenizer::Impl {
  TokenizerSpec spec;
  Vocab vocab;
  std::vector<std::string> bytes;     // decoded bytes per token
  std::vector<TokenType> types;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left,right) -> rank,id
  std::array<int32_t, 256> byte_ids{};  // token of each byte (byte-level or <0xNN>), -1 if none
  bool digits_first = false;           // SmolLM-style pre-tokenizer
  bool merge_by_score = false;         // SentencePiece without merge rules
  // Tokens recognised in text, grouped by first byte, longest first.
  std::array<std::vector<std::pair<std::string_view, int32_t>>, 256> specials;

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::optional<std::pair<double, int32_t>> merge_of(const std::string& text, const Symbol& a,
                                                      const Symbol& b) const {
    if (merge_by_score) {
      auto it = vocab.find(std::string_view(text).substr(a.start, b.end - a.start));
      if (it == vocab.end()) return std::nullopt;
      const float score = spec.scores.empty() ? 0.0f : spec.scores[it->second];
      return std::make_pair(-static_cast<double>(score), it->second);
    }
    if (a.id < 0 || b.id < 0) return std::nullopt;
    auto it = merges.find(pair_key(a.id, b.id));
    if (it == merges.end()) return std::nullopt;
    return std::make_pair(static_cast<double>(it->second.first), it->second.second);
  }

  // Applies merges to the symbols (linked in order) until none applies.
  void bpe(const std::string& text, std::vector<Symbol>& sym) const {
    if (sym.size() < 2) return;
    std::priority_queue<Candidate> queue;
    auto consider = [&](int32_t l) {
      if (l < 0) return;
      const int32_t r = sym[l].next;
      if (r < 0) return;
      if (auto m = merge_of(text, sym[l], sym[r]))
        queue.push({m->first, l, r, sym[l].end, sym[r].end, m->second});
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) consider(i);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& l = sym[top.left];
      if (l.id == -2 || l.next != top.right || l.end != top.left_end) continue;
      Symbol& r = sym[top.right];
      if (r.end != top.right_end) continue;
      l.id = top.id;
      l.end = r.end;
      l.next = r.next;
      if (r.next >= 0) sym[r.next].prev = top.left;
      r.id = -2;  // dead
      consider(l.prev);
      consider(top.left);
    }
  }

  void encode_byte_level(std::string_view text, std::vector<int32_t>& out) const {
    std::vector<Char> chars;
    chars.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      uint32_t cp;
      const int n = unicode::utf8_decode(text, i, cp);
      chars.push_back({cp, static_cast<uint32_t>(i), classify(cp)});
      i += n;
    }
    std::unordered_map<std::string_view, std::vector<int32_t>> cache;
    std::string piece_text;
    std::vector<Symbol> sym;
    auto emit = [&](size_t a, size_t b) {
      const size_t start = chars[a].offset;
      const size_t end = b < chars.size() ? chars[b].offset : text.size();
      const std::string_view piece = text.substr(start, end - start);
      if (piece.size() == 1) {
        if (const int32_t id = byte_ids[static_cast<uint8_t>(piece[0])]; id >= 0) out.push_back(id);
        return;
      }
      auto [it, inserted] = cache.try_emplace(piece);
      if (inserted) {
        piece_text.assign(piece);
        sym.clear();
        // Bytes without a token are dropped (as the reference implementations do).
        for (size_t k = 0; k < piece.size(); ++k) {
          const int32_t id = byte_ids[static_cast<uint8_t>(piece[k])];
          if (id < 0) continue;
          const auto idx = static_cast<int32_t>(sym.size());
          sym.push_back({id, idx - 1, -1, static_cast<uint32_t>(k), static_cast<uint32_t>(k + 1)});
          if (idx > 0) sym[idx - 1].next = idx;
        }
        bpe(piece_text, sym);
        for (const Symbol& s : sym)
          if (s.id != -2) it->second.push_back(s.id);
      }
      out.insert(out.end(), it->second.begin(), it->second.end());
    };
    if (!digits_first) {
      split_gpt2(chars, 0, chars.size(), emit);
      return;
    }
    size_t run = 0;
    for (size_t i = 0; i < chars.size(); ++i) {
      if (chars[i].cls != CharClass::Number) continue;
      if (run < i) split_gpt2(chars, run, i, emit);
      emit(i, i + 1);
      run = i + 1;
    }
    if (run < chars.size()) split_gpt2(chars, run, chars.size(), emit);
  }

  void encode_sentencepiece(std::string_view segment, std::vector<int32_t>& out) const {
    if (segment.empty()) return;
    std::string text;
    text.reserve(segment.size() + segment.size() / 4 + 3);
    if (spec.add_space_prefix) text += kSpaceMarker;
    for (char ch : segment) {
      if (ch == ' ')
        text += kSpaceMarker;
      else
        text += ch;
    }
    std::vector<Symbol> sym;
    sym.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      uint32_t cp;
      const int n = unicode::utf8_decode(text, i, cp);
      auto it = vocab.find(std::string_view(text).substr(i, n));
      const int32_t id = it == vocab.end() ? -1 : it->second;
      const auto idx = static_cast<int32_t>(sym.size());
      sym.push_back({id, idx - 1, -1, static_cast<uint32_t>(i), static_cast<uint32_t>(i + n)});
      if (idx > 0) sym[idx - 1].next = idx;
      i += n;
    }
    bpe(text, sym);
    bool last_unk = false;
    for (const Symbol& s : sym) {
      if (s.id == -2) continue;
      if (s.id >= 0) {
        out.push_back(s.id);
        last_unk = false;
        continue;
      }
      bool bytes_ok = spec.byte_fallback;
      for (uint32_t k = s.start; bytes_ok && k < s.end; ++k)
        bytes_ok = byte_ids[static_cast<uint8_t>(text[k])] >= 0;
      if (bytes_ok) {
        for (uint32_t k = s.start; k < s.end; ++k) out.push_back(byte_ids[static_cast<uint8_t>(text[k])]);
        last_unk = false;
        continue;
      }
      if (spec.unk_id < 0) continue;  // dropped, as the reference implementations do
      if (!(spec.fuse_unk && last_unk)) out.push_back(spec.unk_id);
      last_unk = true;
    }
  }

  void encode_text(std::string_view text, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    if (spec.kind == TokenizerKind::ByteLevelBpe)
      encode_byte_level(text, out);
    else
      encode_sentencepiece(text, out);
  }
};

Tokenizer::Tokenizer(TokenizerSpec spec) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.spec = std::move(spec);
  const TokenizerSpec& s = m.spec;
  const auto n = static_cast<int32_t>(s.tokens.size());
  if (n == 0) throw FormatError("tokenizer: empty vocabulary");
  if (!s.token_types.empty() && s.token_types.size() != s.tokens.size())
    throw FormatError("tokenizer: " + std::to_string(s.token_types.size()) + " token types for " +
                      std::to_string(n) + " tokens");
  if (!s.scores.empty() && s.scores.size() != s.tokens.size())
    throw FormatError("tokenizer: " + std::to_string(s.scores.size()) + " scores for " +
                      std::to_string(n) + " tokens");
  for (int32_t id : {s.bos_id, s.eos_id, s.unk_id, s.pad_id})
    if (id < -1 || id >= n) throw FormatError("tokenizer: special token id " + std::to_string(id) +
                                              " outside the vocabulary of " + std::to_string(n));

  m.types.resize(n, TokenType::Normal);
  for (int32_t i = 0; i < static_cast<int32_t>(s.token_types.size()); ++i) {
    const int32_t t = s.token_types[i];
    if (t < 0 || t > 6) throw FormatError("tokenizer: token " + std::to_string(i) + " has type " +
                                          std::to_string(t));
    m.types[i] = static_cast<TokenType>(t);
  }
  m.vocab.reserve(n);
  for (int32_t i = 0; i < n; ++i) m.vocab.try_emplace(s.tokens[i], i);
  m.byte_ids.fill(-1);

  if (s.kind == TokenizerKind::ByteLevelBpe) {
    const auto map = byte_to_code_point();
    std::unordered_map<uint32_t, uint8_t> inverse;
    for (int b = 0; b < 256; ++b) {
      inverse[map[b]] = static_cast<uint8_t>(b);
      std::string ch;
      unicode::utf8_append(ch, map[b]);
      auto it = m.vocab.find(ch);
      if (it != m.vocab.end()) m.byte_ids[b] = it->second;
    }
    m.bytes.resize(n);
    for (int32_t i = 0; i < n; ++i) {
      const std::string& t = s.tokens[i];
      const TokenType ty = m.types[i];
      if (ty == TokenType::Control || ty == TokenType::UserDefined || ty == TokenType::Unknown) {
        m.bytes[i] = t;
        continue;
      }
      std::string out;
      for (size_t k = 0; k < t.size();) {
        uint32_t cp;
        const int len = unicode::utf8_decode(t, k, cp);
        auto it = inverse.find(cp);
        if (it != inverse.end())
          out += static_cast<char>(it->second);
        else
          out.append(t, k, len);
        k += len;
      }
      m.bytes[i] = std::move(out);
    }
    const std::string& pre = s.pre_tokenizer;
    if (pre == "gpt2" || pre == "gpt-2" || pre == "phi-2" || pre == "roberta-bpe" || pre == "mpt" ||
        pre == "olmo" || pre.empty()) {
      m.digits_first = false;
    } else if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" ||
               pre == "codeshell" || pre == "exaone" || pre == "minerva") {
      m.digits_first = true;
    } else {
      throw FormatError("tokenizer: unsupported pre-tokenizer '" + pre + "'");
    }
    if (s.merges.empty()) throw FormatError("tokenizer: byte-level BPE without merges");
  } else {
    char name[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      auto it = m.vocab.find(std::string_view(name));
      if (it != m.vocab.end()) m.byte_ids[b] = it->second;
    }
    m.bytes.resize(n);
    for (int32_t i = 0; i < n; ++i) {
      const std::string& t = s.tokens[i];
      const TokenType ty = m.types[i];
      if (ty == TokenType::Control || ty == TokenType::UserDefined || ty == TokenType::Unknown) {
        m.bytes[i] = t;
        continue;
      }
      if (t.size() == 6 && t.starts_with("<0x") && t[5] == '>' && std::isxdigit(static_cast<uint8_t>(t[3])) &&
          std::isxdigit(static_cast<uint8_t>(t[4]))) {
        const int b = std::stoi(t.substr(3, 2), nullptr, 16);
        if (m.byte_ids[b] == i) {
          m.bytes[i] = std::string(1, static_cast<char>(b));
          continue;
        }
      }
      std::string out;
      for (size_t k = 0; k < t.size();) {
        if (std::string_view(t).substr(k, 3) == kSpaceMarker) {
          out += ' ';
          k += 3;
        } else {
          out += t[k++];
        }
      }
      m.bytes[i] = std::move(out);
    }
    m.merge_by_score = s.merges.empty();
  }

  m.merges.reserve(s.merges.size());
  for (size_t r = 0; r < s.merges.size(); ++r) {
    const std::string& rule = s.merges[r];
    const size_t sp = rule.find(' ', 1);
    if (sp == std::string::npos)
      throw FormatError("tokenizer: merge " + std::to_string(r) + " '" + rule + "' has no space");
    const std::string_view left = std::string_view(rule).substr(0, sp);
    const std::string_view right = std::string_view(rule).substr(sp + 1);
    auto a = m.vocab.find(left), b = m.vocab.find(right);
    auto c = m.vocab.find(std::string(left) + std::string(right));
    if (a == m.vocab.end() || b == m.vocab.end() || c == m.vocab.end())
      throw FormatError("tokenizer: merge " + std::to_string(r) + " '" + rule +
                        "' uses a token outside the vocabulary");
    m.merges.try_emplace(Impl::pair_key(a->second, b->second), static_cast<int32_t>(r), c->second);
  }

  for (int32_t i = 0; i < n; ++i) {
    const TokenType ty = m.types[i];
    if ((ty == TokenType::Control || ty == TokenType::UserDefined || ty == TokenType::Unknown) &&
        !s.tokens[i].empty())
      m.specials[static_cast<uint8_t>(s.tokens[i][0])].emplace_back(s.tokens[i], i);
  }
  for (auto& list : m.specials)
    std::stable_sort(list.begin(), list.end(),
                     [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_hf_file(const std::string& path) {
  return Tokenizer(tokenizer_spec_from_hf_file(path));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special && m.spec.add_bos && m.spec.bos_id >= 0) out.push_back(m.spec.bos_id);
  size_t seg = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto& list = m.specials[static_cast<uint8_t>(text[i])];
    if (list.empty()) continue;
    for (const auto& [str, id] : list) {
      if (!parse_special && m.types[id] != TokenType::UserDefined) continue;
      if (text.compare(i, str.size(), str) != 0) continue;
      m.encode_text(text.substr(seg, i - seg), out);
      out.push_back(id);
      i += str.size();
      seg = i;
      --i;  // loop increment
      break;
    }
  }
  m.encode_text(text.substr(seg), out);
  if (add_special && m.spec.add_eos && m.spec.eos_id >= 0) out.push_back(m.spec.eos_id);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size())
      throw FormatError("tokenizer: token id " + std::to_string(id) + " outside the vocabulary");
    if (skip_special && is_special(id)) continue;
    out += m.bytes[id];
  }
  if (m.spec.kind == TokenizerKind::SentencePieceBpe && m.spec.add_space_prefix &&
      !out.empty() && out[0] == ' ')
    out.erase(0, 1);
  return out;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw FormatError("tokenizer: token id " + std::to_string(id) + " outside the vocabulary");
  return impl_->bytes[id];
}

const std::string& Tokenizer::token_text(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw FormatError("tokenizer: token id " + std::to_string(id) + " outside the vocabulary");
  return impl_->spec.tokens[id];
}

int32_t Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->spec.tokens.size()); }
int32_t Tokenizer::bos() const { return impl_->spec.bos_id; }
int32_t Tokenizer::eos() const { return impl_->spec.eos_id; }
int32_t Tokenizer::unk() const { return impl_->spec.unk_id; }
int32_t Tokenizer::pad() const { return impl_->spec.pad_id; }
bool Tokenizer::add_bos() const { return impl_->spec.add_bos; }
bool Tokenizer::add_eos() const { return impl_->spec.add_eos; }
const TokenizerSpec& Tokenizer::spec() const { return impl_->spec; }

TokenType Tokenizer::token_type(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw FormatError("tokenizer: token id " + std::to_string(id) + " outside the vocabulary");
  return impl_->types[id];
}

bool Tokenizer::is_special(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return false;
  const TokenType t = impl_->types[id];
  return t == TokenType::Control || t == TokenType::Unknown;
}

std::string Tokenizer::apply_chat_template(
    const std::vector<std::pair<std::string, std::string>>& messages,
    bool add_generation_prompt) const {
  return apply_chatml_template(impl_->spec.chat_template, messages, add_generation_prompt);
}

// ---------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------
std::string apply_chatml_template(std::string_view tpl,
                                  const std::vector<std::pair<std::string, std::string>>& messages,
                                  bool add_generation_prompt) {
  if (tpl.find("<|im_start|>") == std::string_view::npos)
    throw FormatError(tpl.empty() ? "tokenizer: the model has no chat template"
                                  : "tokenizer: unsupported chat template (only ChatML is supported)");
  // A default system prompt is a literal "<|im_start|>system\n...<|im_end|>" in the template.
  std::optional<std::string> default_system;
  constexpr std::string_view kSys = "<|im_start|>system";
  if (size_t p = tpl.find(kSys); p != std::string_view::npos) {
    p += kSys.size();
    if (tpl.substr(p, 1) == "\n")
      p += 1;
    else if (tpl.substr(p, 2) == "\\n")
      p += 2;
    else
      p = std::string_view::npos;
    if (p != std::string_view::npos) {
      const size_t e = tpl.find("<|im_end|>", p);
      if (e != std::string_view::npos) {
        const std::string_view body = tpl.substr(p, e - p);
        if (body.find_first_of("'\"{}+") == std::string_view::npos) {
          std::string text;
          for (size_t k = 0; k < body.size(); ++k) {
            if (body[k] == '\\' && k + 1 < body.size() && body[k + 1] == 'n') {
              text += '\n';
              ++k;
            } else {
              text += body[k];
            }
          }
          default_system = std::move(text);
        }
      }
    }
  }
  std::string out;
  if (default_system && !messages.empty() && messages.front().first != "system")
    out += "<|im_start|>system\n" + *default_system + "<|im_end|>\n";
  for (const auto& [role, content] : messages) out += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace micromix::model
