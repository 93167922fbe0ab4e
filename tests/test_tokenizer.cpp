// Tokenizer tests: unit checks on small hand-made vocabularies, and exact agreement with
// reference ids produced by the Hugging Face `tokenizers` library
// (scripts/gen_tokenizer_vectors.py) for SmolLM2 (GGUF) and Mistral-7B (tokenizer.json).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "micromix/model/gguf.h"
#include "micromix/model/tokenizer.h"
#include "micromix/model/tokenizer_gguf.h"

namespace fs = std::filesystem;
using micromix::FormatError;
using micromix::model::Tokenizer;
using micromix::model::TokenizerKind;
using micromix::model::TokenizerSpec;
using nlohmann::json;

namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

std::string data_dir() { return env_or("MICROMIX_DATA", MICROMIX_SOURCE_DIR "/../shared/data"); }
std::string vectors_dir() { return MICROMIX_SOURCE_DIR "/tests/data/tokenizer"; }

std::string model_path() {
  if (const char* m = std::getenv("MICROMIX_MODEL"); m && *m) return m;
  const std::string file = "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (const char* c = std::getenv("MICROMIX_CACHE"); c && *c) return c + file;
  return env_or("HOME", "/root") + "/.cache/micromix" + file;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_json(const std::string& path) { return json::parse(read_file(path)); }

std::string mistral_json_path() { return data_dir() + "/tokenizers/mistral-7b-v0.1/tokenizer.json"; }
std::string wikitext_path() { return data_dir() + "/wikitext-2-raw/wiki.test.raw"; }

const Tokenizer* mistral() {
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    if (!fs::exists(mistral_json_path())) return nullptr;
    return std::make_unique<Tokenizer>(Tokenizer::from_hf_file(mistral_json_path()));
  }();
  return tok.get();
}

const Tokenizer* smollm2() {
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    if (!fs::exists(model_path())) return nullptr;
    const auto file = micromix::model::GgufFile::open(model_path());
    return std::make_unique<Tokenizer>(micromix::model::tokenizer_from_gguf(file));
  }();
  return tok.get();
}

const Tokenizer* by_name(const std::string& name) { return name == "mistral" ? mistral() : smollm2(); }

std::string fnv1a64(const int32_t* ids, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; ++i) {
    const auto v = static_cast<uint32_t>(ids[i]);
    for (int b = 0; b < 4; ++b) {
      h ^= (v >> (8 * b)) & 0xFF;
      h *= 0x100000001B3ull;
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}

// A byte-level vocabulary: the 256 byte tokens, a few merges and two control tokens.
TokenizerSpec tiny_byte_level_spec() {
  TokenizerSpec s;
  s.kind = TokenizerKind::ByteLevelBpe;
  // GPT-2 byte alphabet in byte order.
  for (int b = 0; b < 256; ++b) {
    uint32_t cp = static_cast<uint32_t>(b);
    const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    if (!direct) {
      int k = 0;
      for (int x = 0; x < b; ++x)
        if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE))) ++k;
      cp = 256 + k;
    }
    std::string t;
    micromix::model::unicode::utf8_append(t, cp);
    s.tokens.push_back(t);
  }
  for (const char* t : {"he", "ll", "hell", "hello", "\xC4\xA0h", "\xC4\xA0hello", "<|a|>", "<|ab|>"})
    s.tokens.push_back(t);
  s.merges = {"h e", "l l", "he ll", "hell o", "\xC4\xA0 h"};
  s.token_types.assign(s.tokens.size(), 1);
  s.token_types[s.tokens.size() - 2] = 3;
  s.token_types[s.tokens.size() - 1] = 3;
  s.pre_tokenizer = "gpt2";
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------

TEST(TokenizerUnicode, Classes) {
  using namespace micromix::model::unicode;
  EXPECT_TRUE(is_letter('a'));
  EXPECT_TRUE(is_letter(0x00E9));   // é
  EXPECT_TRUE(is_letter(0x4E16));   // CJK
  EXPECT_TRUE(is_letter(0x05E9));   // Hebrew shin
  EXPECT_FALSE(is_letter(0x0301));  // combining acute (Mn)
  EXPECT_FALSE(is_letter('1'));
  EXPECT_TRUE(is_number('7'));
  EXPECT_TRUE(is_number(0x0661));   // Arabic-Indic one
  EXPECT_TRUE(is_number(0x00BD));   // ½ (No)
  EXPECT_TRUE(is_number(0x2163));   // Ⅳ (Nl)
  EXPECT_FALSE(is_number('a'));
  EXPECT_TRUE(is_whitespace(' '));
  EXPECT_TRUE(is_whitespace('\n'));
  EXPECT_TRUE(is_whitespace(0x3000));
  EXPECT_TRUE(is_whitespace(0x00A0));
  EXPECT_FALSE(is_whitespace(0x200B));  // zero width space is not White_Space
  EXPECT_FALSE(is_letter(0x1F600));
}

TEST(TokenizerUnicode, Utf8) {
  using namespace micromix::model::unicode;
  uint32_t cp;
  EXPECT_EQ(utf8_decode("\xE4\xB8\x96", 0, cp), 3);
  EXPECT_EQ(cp, 0x4E16u);
  EXPECT_EQ(utf8_decode("\xF0\x9F\x98\x80", 0, cp), 4);
  EXPECT_EQ(cp, 0x1F600u);
  EXPECT_EQ(utf8_decode("\xC0\xAF", 0, cp), 1);  // overlong
  EXPECT_EQ(cp, 0xFFFFFFFFu);
  EXPECT_EQ(utf8_decode("\xE4\xB8", 0, cp), 1);  // truncated
  EXPECT_EQ(utf8_decode("\xED\xA0\x80", 0, cp), 1);  // surrogate
  std::string s;
  utf8_append(s, 0x1F600);
  EXPECT_EQ(s, "\xF0\x9F\x98\x80");
  EXPECT_EQ(utf8_complete_prefix("ab\xF0\x9F\x98"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(utf8_complete_prefix("ab\xE4"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\xC3\xA9"), 4u);
  EXPECT_EQ(utf8_complete_prefix(""), 0u);
  EXPECT_EQ(utf8_complete_prefix("a\x80"), 2u);  // stray continuation: nothing to wait for
}

TEST(TokenizerByteLevel, TinyVocabulary) {
  const Tokenizer tok(tiny_byte_level_spec());
  const int32_t hello = tok.token_id("hello");
  const int32_t sp_h = tok.token_id("\xC4\xA0h");
  const int32_t a = tok.token_id("<|a|>"), ab = tok.token_id("<|ab|>");
  ASSERT_GE(hello, 256);
  EXPECT_EQ(tok.encode("hello", false), std::vector<int32_t>{hello});
  // " hello" is one piece: Ġ h e l l o -> Ġh + hell + o? merges: "h e" (0), "l l" (1),
  // "he ll" (2), "hell o" (3), "Ġ h" (4). Rank 4 merges Ġ h first? No: lowest rank first,
  // "h e" (rank 0) wins over "Ġ h" (rank 4), then ll, hell, hello; "Ġ hello" has no rule.
  const int32_t space = tok.token_id("\xC4\xA0");
  EXPECT_EQ(tok.encode(" hello", false), (std::vector<int32_t>{space, hello}));
  EXPECT_EQ(tok.encode(" h", false), std::vector<int32_t>{sp_h});
  // Longest special match first; specials split the text.
  EXPECT_EQ(tok.encode("<|ab|>hello<|a|>", false), (std::vector<int32_t>{ab, hello, a}));
  EXPECT_EQ(tok.encode("<|ab|>", false, /*parse_special=*/false).size(), 6u);
  EXPECT_TRUE(tok.is_special(a));
  EXPECT_FALSE(tok.is_special(hello));
  // Round trip of arbitrary bytes, invalid UTF-8 included.
  std::string bytes;
  for (int b = 0; b < 256; ++b) bytes += static_cast<char>(b);
  bytes += "\xFF\xFE hello \xC3 world\xE2\x82";
  const auto ids = tok.encode(bytes, false);
  EXPECT_EQ(tok.decode(ids), bytes);
  std::string streamed;
  for (int32_t id : ids) streamed += tok.token_bytes(id);
  EXPECT_EQ(streamed, bytes);
  EXPECT_THROW(tok.decode(std::vector<int32_t>{tok.vocab_size()}), FormatError);
}

TEST(TokenizerByteLevel, PreTokenizerPieces) {
  // With no merges beyond single bytes, the ids show where pieces are cut only through
  // decode, so check the GPT-2 split on a vocabulary whose only multi-byte tokens are whole
  // words: each piece that is a word becomes one token.
  TokenizerSpec s = tiny_byte_level_spec();
  const Tokenizer tok(s);
  // Digits are split one by one by the smollm pre-tokenizer but not by gpt2; both round trip.
  s.pre_tokenizer = "smollm";
  const Tokenizer tok2(s);
  for (const char* text : {"a 123 b", "  x\n\n y", "it's 've 'LL", "\t\t hello  "}) {
    EXPECT_EQ(tok.decode(tok.encode(text, false)), text);
    EXPECT_EQ(tok2.decode(tok2.encode(text, false)), text);
  }
  s.pre_tokenizer = "no-such-pattern";
  EXPECT_THROW(Tokenizer{s}, FormatError);
}

TEST(TokenizerSpecErrors, Malformed) {
  TokenizerSpec s = tiny_byte_level_spec();
  s.merges.push_back("zz qq");
  EXPECT_THROW(Tokenizer{s}, FormatError);
  s = tiny_byte_level_spec();
  s.token_types.pop_back();
  EXPECT_THROW(Tokenizer{s}, FormatError);
  s = tiny_byte_level_spec();
  s.bos_id = 100000;
  EXPECT_THROW(Tokenizer{s}, FormatError);
  EXPECT_THROW(Tokenizer{TokenizerSpec{}}, FormatError);
  EXPECT_THROW(micromix::model::tokenizer_spec_from_hf_json("{"), FormatError);
  EXPECT_THROW(micromix::model::tokenizer_spec_from_hf_json(R"({"model":{"type":"Unigram","vocab":[]}})"),
               FormatError);
  EXPECT_THROW(micromix::model::tokenizer_spec_from_hf_json(R"({"model":{"type":"BPE","vocab":3}})"),
               FormatError);
}

TEST(TokenizerSentencePiece, TinyVocabulary) {
  TokenizerSpec s;
  s.kind = TokenizerKind::SentencePieceBpe;
  s.tokens = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    s.tokens.push_back(name);
  }
  const std::string m = "\xE2\x96\x81";
  for (const std::string& t : {m, std::string("a"), std::string("b"), m + "a", m + "ab", std::string("ab")})
    s.tokens.push_back(t);
  s.token_types.assign(s.tokens.size(), 1);
  s.token_types[0] = 2;
  s.token_types[1] = s.token_types[2] = 3;
  for (int b = 0; b < 256; ++b) s.token_types[3 + b] = 6;
  s.merges = {"a b", m + " a", m + "a b"};
  s.unk_id = 0;
  s.bos_id = 1;
  s.eos_id = 2;
  s.add_bos = true;
  const Tokenizer tok(s);
  const int32_t mab = tok.token_id(m + "ab"), ab = tok.token_id("ab"), sp = tok.token_id(m);
  // "ab ab": ▁ab▁ab; "a b" (rank 0) first gives ▁ ab ▁ ab; "▁ a" no longer applies.
  EXPECT_EQ(tok.encode("ab ab", false), (std::vector<int32_t>{sp, ab, sp, ab}));
  EXPECT_EQ(tok.encode("a", true), (std::vector<int32_t>{1, tok.token_id(m + "a")}));
  // Byte fallback for characters outside the vocabulary.
  EXPECT_EQ(tok.encode("\xC3\xA9", false), (std::vector<int32_t>{sp, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok.decode(tok.encode("x \xC3\xA9 ab", true), true), "x \xC3\xA9 ab");
  EXPECT_EQ(tok.token_bytes(sp), " ");
  // Without byte fallback unknown characters fuse into one <unk>.
  s.byte_fallback = false;
  const Tokenizer tok2(s);
  EXPECT_EQ(tok2.encode("xyz", false), (std::vector<int32_t>{sp, 0}));
  (void)mab;
}

TEST(TokenizerHfJson, ByteLevelDefinition) {
  // A miniature tokenizer.json in the layout of SmolLM2's: digits split, then ByteLevel.
  const std::string text = R"({
    "added_tokens": [{"id": 6, "content": "<|endoftext|>", "special": true},
                     {"id": 7, "content": "<tag>", "special": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
    "post_processor": {"type": "ByteLevel", "trim_offsets": false},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "unk_token": null, "byte_fallback": false,
              "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4, "1": 5},
              "merges": [["a", "b"], "Ġ ab"]}
  })";
  const TokenizerSpec spec = micromix::model::tokenizer_spec_from_hf_json(text);
  EXPECT_EQ(spec.kind, TokenizerKind::ByteLevelBpe);
  EXPECT_EQ(spec.pre_tokenizer, "smollm");
  EXPECT_EQ(spec.tokens.size(), 8u);
  EXPECT_EQ(spec.merges, (std::vector<std::string>{"a b", "\xC4\xA0 ab"}));
  EXPECT_EQ(spec.token_types[6], static_cast<int32_t>(micromix::model::TokenType::Control));
  EXPECT_EQ(spec.token_types[7], static_cast<int32_t>(micromix::model::TokenType::UserDefined));
  EXPECT_EQ(spec.bos_id, 6);
  EXPECT_FALSE(spec.add_bos);
  // Byte-level vocabularies normally hold all 256 bytes; bytes without a token are dropped.
  const Tokenizer tok(spec);
  EXPECT_EQ(tok.encode("ab ab<tag>11<|endoftext|>", true), (std::vector<int32_t>{2, 4, 7, 5, 5, 6}));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{2, 4, 7, 6}, /*skip_special=*/true), "ab ab<tag>");
}

TEST(TokenizerSentencePiece, MergeByScoreMatchesMergeRules) {
  // GGUF SentencePiece vocabularies carry scores instead of merge rules. Scoring each token
  // by the rank of the first rule that builds it must give the same ids as the rules.
  if (!mistral()) GTEST_SKIP() << "no " << mistral_json_path();
  if (!fs::exists(wikitext_path())) GTEST_SKIP() << "no " << wikitext_path();
  TokenizerSpec spec = micromix::model::tokenizer_spec_from_hf_file(mistral_json_path());
  spec.scores.assign(spec.tokens.size(), -1e9f);
  const Tokenizer rules(spec);
  for (size_t r = 0; r < spec.merges.size(); ++r) {
    const std::string& m = spec.merges[r];
    const size_t sp = m.find(' ', 1);
    const int32_t id = rules.token_id(m.substr(0, sp) + m.substr(sp + 1));
    ASSERT_GE(id, 0);
    spec.scores[id] = std::max(spec.scores[id], -static_cast<float>(r));
  }
  spec.merges.clear();
  const Tokenizer scores(spec);
  const std::string text = read_file(wikitext_path());
  EXPECT_TRUE(scores.encode(text, true) == rules.encode(text, true));
  for (const char* s : {"Hello world", "  multiple   spaces", "\xE4\xBD\xA0\xE5\xA5\xBD", "x <s> y"})
    EXPECT_EQ(show(scores.encode(s, true)), show(rules.encode(s, true))) << s;
}

TEST(TokenizerChat, ChatMlTemplate) {
  const json chat = read_json(vectors_dir() + "/chat.json");
  const std::string tpl = chat.at("template");
  int matched = 0, total = 0;
  for (const json& c : chat.at("cases")) {
    std::vector<std::pair<std::string, std::string>> messages;
    for (const json& m : c.at("messages")) messages.emplace_back(m[0], m[1]);
    const std::string got =
        micromix::model::apply_chatml_template(tpl, messages, c.at("add_generation_prompt"));
    ++total;
    if (got == c.at("rendered").get<std::string>()) ++matched;
    EXPECT_EQ(got, c.at("rendered").get<std::string>());
  }
  std::printf("chat template renderings matching jinja2: %d / %d\n", matched, total);
  EXPECT_THROW(micromix::model::apply_chatml_template("{{ bos_token }}[INST]", {}, true), FormatError);
  // A template without a default system prompt.
  const std::string plain =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
      "'<|im_end|>' + '\\n'}}{% endfor %}";
  EXPECT_EQ(micromix::model::apply_chatml_template(plain, {{"user", "hi"}}, true),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

// ---------------------------------------------------------------------------------------
// Agreement with the reference
// ---------------------------------------------------------------------------------------

class TokenizerReference : public ::testing::TestWithParam<std::string> {
 protected:
  const Tokenizer* tok() {
    const Tokenizer* t = by_name(GetParam());
    if (!t) return nullptr;
    return t;
  }
};

TEST_P(TokenizerReference, EdgeCases) {
  const Tokenizer* t = tok();
  if (!t) GTEST_SKIP() << GetParam() << " tokenizer not available";
  const std::string name = GetParam();
  const json cases = read_json(vectors_dir() + "/cases.json");
  int enc = 0, enc_special = 0, dec = 0;
  for (const json& c : cases) {
    const std::string text = c.at("text");
    const auto want = c.at(name).get<std::vector<int32_t>>();
    const auto want_special = c.at(name + "_special").get<std::vector<int32_t>>();
    const std::string want_decoded = c.at(name + "_decoded");
    const auto got = t->encode(text, false);
    const auto got_special = t->encode(text, true);
    const std::string decoded = t->decode(got);
    enc += got == want;
    enc_special += got_special == want_special;
    dec += decoded == want_decoded;
    EXPECT_EQ(show(got), show(want)) << "text: " << text;
    EXPECT_EQ(show(got_special), show(want_special)) << "text: " << text;
    EXPECT_EQ(decoded, want_decoded) << "text: " << text;
  }
  std::printf("%s edge cases: encode %d/%zu, encode+special %d/%zu, decode %d/%zu exact\n",
              name.c_str(), enc, cases.size(), enc_special, cases.size(), dec, cases.size());
}

TEST_P(TokenizerReference, WikiText2Test) {
  const Tokenizer* t = tok();
  if (!t) GTEST_SKIP() << GetParam() << " tokenizer not available";
  if (!fs::exists(wikitext_path())) GTEST_SKIP() << "no " << wikitext_path();
  const std::string name = GetParam();
  const json ref = read_json(vectors_dir() + "/wikitext_" + name + ".json");
  const std::string text = read_file(wikitext_path());
  ASSERT_EQ(text.size(), ref.at("bytes").get<size_t>());

  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = t->encode(text, false);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: WikiText-2 test (%zu bytes) -> %zu tokens in %.3f s\n", name.c_str(), text.size(),
              ids.size(), secs);
  EXPECT_LT(secs, 5.0);

  EXPECT_EQ(ids.size(), ref.at("length").get<size_t>());
  const auto first = ref.at("first").get<std::vector<int32_t>>();
  const auto last = ref.at("last").get<std::vector<int32_t>>();
  ASSERT_GE(ids.size(), first.size());
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + first.size()), first);
  EXPECT_EQ(std::vector<int32_t>(ids.end() - last.size(), ids.end()), last);
  const size_t chunk = ref.at("chunk");
  const auto chunk_fnv = ref.at("chunk_fnv").get<std::vector<std::string>>();
  size_t chunks_ok = 0, first_bad = SIZE_MAX;
  for (size_t c = 0; c < chunk_fnv.size(); ++c) {
    const size_t b = c * chunk;
    const size_t n = b < ids.size() ? std::min(chunk, ids.size() - b) : 0;
    const bool ok = n > 0 && fnv1a64(ids.data() + b, n) == chunk_fnv[c];
    chunks_ok += ok;
    if (!ok && first_bad == SIZE_MAX) first_bad = c;
  }
  std::printf("%s: whole-file ids: %zu/%zu chunks of %zu match (length %zu vs %zu)\n", name.c_str(),
              chunks_ok, chunk_fnv.size(), chunk, ids.size(), ref.at("length").get<size_t>());
  EXPECT_EQ(chunks_ok, chunk_fnv.size()) << "first differing chunk " << first_bad;

  // Line by line (each line with its newline).
  const auto line_fnv = ref.at("line_fnv").get<std::vector<std::string>>();
  const auto line_len = ref.at("line_lengths").get<std::vector<size_t>>();
  size_t line = 0, lines_ok = 0, pos = 0;
  std::string first_bad_line;
  while (pos < text.size()) {
    size_t e = text.find('\n', pos);
    e = e == std::string::npos ? text.size() : e + 1;
    const auto lid = t->encode(std::string_view(text).substr(pos, e - pos), false);
    const bool ok = line < line_fnv.size() && lid.size() == line_len[line] &&
                    fnv1a64(lid.data(), lid.size()) == line_fnv[line];
    lines_ok += ok;
    if (!ok && first_bad_line.empty()) first_bad_line = text.substr(pos, e - pos);
    ++line;
    pos = e;
  }
  std::printf("%s: lines: %zu/%zu match\n", name.c_str(), lines_ok, line_fnv.size());
  EXPECT_EQ(line, line_fnv.size());
  EXPECT_EQ(lines_ok, line_fnv.size()) << "first differing line: " << first_bad_line;

  // Decode round trip (exact for byte-level BPE; SentencePiece too since WikiText has no
  // characters outside the byte fallback and no leading-space ambiguity after stripping).
  const std::string back = t->decode(ids);
  if (t->spec().kind == TokenizerKind::ByteLevelBpe) {
    EXPECT_TRUE(back == text) << "decode(encode(WikiText-2)) differs";
    std::printf("%s: decode(encode(text)) == text: %s\n", name.c_str(), back == text ? "yes" : "no");
  } else {
    EXPECT_TRUE(back == text) << "decode(encode(WikiText-2)) differs";
    std::printf("%s: decode(encode(text)) == text: %s\n", name.c_str(), back == text ? "yes" : "no");
  }
}

TEST_P(TokenizerReference, StateOfTheUnion) {
  const Tokenizer* t = tok();
  if (!t) GTEST_SKIP() << GetParam() << " tokenizer not available";
  const std::string dir = data_dir() + "/sotu";
  if (!fs::exists(dir)) GTEST_SKIP() << "no " << dir;
  const std::string name = GetParam();
  const json ref = read_json(vectors_dir() + "/sotu.json");
  const auto files = ref.at("files").get<std::vector<std::string>>();
  const json& want = ref.at(name);
  size_t ok = 0, tokens = 0, bytes = 0;
  double secs = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string text = read_file(dir + "/" + files[i]);
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = t->encode(text, false);
    secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens += ids.size();
    bytes += text.size();
    const bool match = ids.size() == want[i][0].get<size_t>() &&
                       fnv1a64(ids.data(), ids.size()) == want[i][1].get<std::string>();
    ok += match;
    EXPECT_TRUE(match) << files[i];
    EXPECT_EQ(t->decode(ids), text) << files[i];
  }
  std::printf("%s: State of the Union: %zu/%zu files match (%zu bytes, %zu tokens, %.2f s)\n",
              name.c_str(), ok, files.size(), bytes, tokens, secs);
}

INSTANTIATE_TEST_SUITE_P(Models, TokenizerReference, ::testing::Values("smollm2", "mistral"),
                         [](const auto& info) { return info.param; });

TEST(TokenizerSmolLM2, Metadata) {
  const Tokenizer* t = smollm2();
  if (!t) GTEST_SKIP() << "no model at " << model_path();
  EXPECT_EQ(t->vocab_size(), 49152);
  EXPECT_EQ(t->spec().kind, TokenizerKind::ByteLevelBpe);
  EXPECT_EQ(t->spec().pre_tokenizer, "smollm");
  EXPECT_EQ(t->bos(), 1);
  EXPECT_EQ(t->eos(), 2);
  EXPECT_FALSE(t->add_bos());
  EXPECT_TRUE(t->is_special(t->token_id("<|im_start|>")));
  EXPECT_EQ(t->token_text(1), "<|im_start|>");
  const json chat = read_json(vectors_dir() + "/chat.json");
  EXPECT_EQ(t->spec().chat_template, chat.at("template").get<std::string>());
  const std::string prompt = t->apply_chat_template({{"user", "What is 2+2?"}}, true);
  EXPECT_EQ(prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
  const auto ids = t->encode(prompt, false);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(t->decode(ids), prompt);
  // Streaming decode of split multi-byte characters.
  const std::string emoji = "\xF0\x9F\x98\x80\xE4\xB8\x96";
  std::string streamed, pending;
  for (int32_t id : t->encode(emoji, false)) {
    pending += t->token_bytes(id);
    const size_t n = micromix::model::unicode::utf8_complete_prefix(pending);
    streamed += pending.substr(0, n);
    pending.erase(0, n);
  }
  EXPECT_EQ(pending, "");
  EXPECT_EQ(streamed, emoji);
  // Invalid UTF-8 round trips through the byte alphabet; bytes the vocabulary has no token
  // for (0xFF, 0xC0, ... in SmolLM2) are dropped.
  const std::string junk = "ok \xC3 \xE2\x82 end\x80\xBF";
  EXPECT_EQ(t->decode(t->encode(junk, false)), junk);
  EXPECT_EQ(t->decode(t->encode("a\xFF\xC0" "b", false)), "ab");
}

TEST(TokenizerMistral, Metadata) {
  const Tokenizer* t = mistral();
  if (!t) GTEST_SKIP() << "no " << mistral_json_path();
  EXPECT_EQ(t->vocab_size(), 32000);
  EXPECT_EQ(t->spec().kind, TokenizerKind::SentencePieceBpe);
  EXPECT_EQ(t->bos(), 1);
  EXPECT_EQ(t->eos(), 2);
  EXPECT_EQ(t->unk(), 0);
  EXPECT_TRUE(t->add_bos());
  EXPECT_FALSE(t->add_eos());
  EXPECT_EQ(t->token_id("\xE2\x96\x81The"), 415);
  EXPECT_EQ(t->encode("Hello", true), (std::vector<int32_t>{1, 22557}));
  EXPECT_EQ(t->decode(t->encode("Hello world", true), true), "Hello world");
  EXPECT_EQ(t->token_bytes(t->token_id("<0x0A>")), "\n");
  EXPECT_EQ(t->spec().chat_template, "");  // Mistral-7B v0.1 has none
  EXPECT_THROW(t->apply_chat_template({{"user", "hi"}}, true), FormatError);
  const std::string junk = "ok \xFF\xFE\xC3 end";
  EXPECT_EQ(t->decode(t->encode(junk, false)), junk);
}
