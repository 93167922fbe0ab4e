// Zero-shot evaluation: requests built from real docs against the strings that
// lm-evaluation-harness 0.4 renders from its task YAMLs, metric aggregation (acc vs
// acc_norm, stderr, perplexity with its bootstrap stderr), lm-eval's context /
// continuation tokenization, and prefix-sharing scoring against from-scratch scoring
// on a small random model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "micromix/common/error.h"
#include "micromix/eval/harness.h"
#include "micromix/eval/perplexity.h"
#include "micromix/eval/tasks.h"
#include "micromix/model/llama.h"

using namespace micromix;
using namespace micromix::eval;

namespace {

std::string data_dir_or_skip() {
  const std::string dir = resolve_data_dir();
  if (!std::filesystem::is_directory(std::filesystem::path(dir) / "piqa")) return "";
  return dir;
}

#define REQUIRE_DATA(dir)                                                   \
  const std::string dir = data_dir_or_skip();                               \
  if (dir.empty()) GTEST_SKIP() << "evaluation data folder not found";

void expect_request(const LoglikelihoodRequest& r, const std::string& context, const std::string& continuation) {
  EXPECT_EQ(r.context, context);
  EXPECT_EQ(r.continuation, continuation);
}

}  // namespace

// ---- requests from real docs -------------------------------------------------------

TEST(EvalTasks, LambadaSplitsOffTheLastWord) {
  REQUIRE_DATA(dir);
  const Task t = load_task("lambada_openai", dir, 2);
  ASSERT_EQ(t.docs.size(), 2u);
  EXPECT_EQ(t.output, TaskOutput::Loglikelihood);
  EXPECT_EQ(t.metrics, (std::vector<std::string>{"perplexity", "acc"}));
  ASSERT_EQ(t.docs[0].requests.size(), 1u);
  const auto& r0 = t.docs[0].requests[0];
  EXPECT_EQ(r0.context.size(), 339u);
  EXPECT_EQ(r0.context.substr(0, 51), "In my palm is a clear stone, and inside it is a sma");
  EXPECT_EQ(r0.context.substr(r0.context.size() - 60),
            "in, his mouth curved in a confident grin, I don't care about");
  EXPECT_EQ(r0.continuation, " signs");
  const auto& r1 = t.docs[1].requests[0];
  EXPECT_EQ(r1.context.substr(r1.context.size() - 60),
            "ed leading her to the dock.\n\n\"I can make it there on my own,");
  EXPECT_EQ(r1.continuation, " Shane");
}

TEST(EvalTasks, PiqaQuestionAnswerTemplate) {
  REQUIRE_DATA(dir);
  const Task t = load_task("piqa", dir, 2);
  ASSERT_EQ(t.docs.size(), 2u);
  EXPECT_EQ(t.metrics, (std::vector<std::string>{"acc", "acc_norm"}));
  const std::string c0 = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:";
  ASSERT_EQ(t.docs[0].requests.size(), 2u);
  expect_request(t.docs[0].requests[0], c0,
                 " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
                 "will also need to supply it with a water bottle and a food dish.");
  expect_request(t.docs[0].requests[1], c0,
                 " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                 "you will also need to supply it with a water bottle and a food dish.");
  EXPECT_EQ(t.docs[0].gold, 0);
  // whitespace inside and at the end of a choice is kept as it is
  expect_request(t.docs[1].requests[0], "Question: dresser\nAnswer:", " replace drawer with bobby pin ");
  expect_request(t.docs[1].requests[1], "Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ");
  EXPECT_EQ(t.docs[1].choices[1], "finish, woodgrain with  bobby pin ");
  EXPECT_EQ(t.docs[1].gold, 1);
}

TEST(EvalTasks, ArcLettersAndDigitLabels) {
  REQUIRE_DATA(dir);
  const Task easy = load_task("arc_easy", dir, 15);
  ASSERT_EQ(easy.docs.size(), 15u);
  const std::string q0 =
      "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:";
  ASSERT_EQ(easy.docs[0].requests.size(), 4u);
  expect_request(easy.docs[0].requests[0], q0, " Sunlight is the source of energy for nearly all ecosystems.");
  expect_request(easy.docs[0].requests[1], q0, " Most ecosystems are found on land instead of in water.");
  expect_request(easy.docs[0].requests[2], q0, " Carbon dioxide is more available than other gases.");
  expect_request(easy.docs[0].requests[3], q0, " The producers in all ecosystems are plants.");
  EXPECT_EQ(easy.docs[0].gold, 0);
  // NYSEDREGENTS_2015_8_28, labels 1-4, answerKey "2"
  const auto& d = easy.docs[14];
  const std::string q14 = "Question: All living and nonliving material is composed of\nAnswer:";
  ASSERT_EQ(d.requests.size(), 4u);
  expect_request(d.requests[0], q14, " air");
  expect_request(d.requests[1], q14, " elements");
  expect_request(d.requests[2], q14, " water");
  expect_request(d.requests[3], q14, " soil");
  EXPECT_EQ(d.choices, (std::vector<std::string>{"air", "elements", "water", "soil"}));
  EXPECT_EQ(d.gold, 1);

  const Task challenge = load_task("arc_challenge", dir, 45);
  const std::string c0 =
      "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
      "likely effect of this increase in rotation?\nAnswer:";
  expect_request(challenge.docs[0].requests[2], c0, " Planetary days will become shorter.");
  EXPECT_EQ(challenge.docs[0].gold, 2);
  // NYSEDREGENTS_2008_8_34, labels 1-4, answerKey "2"
  const auto& c = challenge.docs[44];
  const std::string q44 =
      "Question: Which statement best describes the energy changes that occur while a child is riding on a sled "
      "down a steep, snow-covered hill?\nAnswer:";
  expect_request(c.requests[0], q44, " Kinetic energy decreases and potential energy increases.");
  expect_request(c.requests[1], q44, " Kinetic energy increases and potential energy decreases.");
  expect_request(c.requests[3], q44, " Both potential energy and kinetic energy increase.");
  EXPECT_EQ(c.gold, 1);
  // 3- and 5-choice questions keep their own counts
  const Task all = load_task("arc_easy", dir);
  EXPECT_EQ(all.docs.size(), 2376u);
  std::map<size_t, int> counts;
  for (const auto& doc : all.docs) {
    counts[doc.requests.size()]++;
    EXPECT_GE(doc.gold, 0);
    EXPECT_LT(doc.gold, static_cast<int>(doc.requests.size()));
  }
  EXPECT_EQ(counts[3], 7);
  EXPECT_EQ(counts[4], 2365);
  EXPECT_EQ(counts[5], 4);
}

TEST(EvalTasks, WinograndePartialScoring) {
  REQUIRE_DATA(dir);
  const Task t = load_task("winogrande", dir, 2);
  EXPECT_EQ(t.metrics, (std::vector<std::string>{"acc"}));
  ASSERT_EQ(t.docs[0].requests.size(), 2u);
  expect_request(t.docs[0].requests[0], "Sarah was a much better surgeon than Maria so Sarah",
                 " always got the easier cases.");
  expect_request(t.docs[0].requests[1], "Sarah was a much better surgeon than Maria so Maria",
                 " always got the easier cases.");
  EXPECT_EQ(t.docs[0].gold, 1);
  expect_request(t.docs[1].requests[0], "Sarah was a much better surgeon than Maria so Sarah",
                 " always got the harder cases.");
  EXPECT_EQ(t.docs[1].gold, 0);
}

TEST(EvalTasks, FullTaskSizesAndLimit) {
  REQUIRE_DATA(dir);
  EXPECT_EQ(load_task("lambada_openai", dir).docs.size(), 5153u);
  EXPECT_EQ(load_task("piqa", dir).request_count(), 2u * 1838u);
  EXPECT_EQ(load_task("arc_challenge", dir).docs.size(), 1172u);
  EXPECT_EQ(load_task("winogrande", dir).request_count(), 2u * 1267u);
  EXPECT_EQ(load_task("piqa", dir, 0).docs.size(), 0u);
  EXPECT_THROW(load_task("hellaswag", dir), std::invalid_argument);
  EXPECT_THROW(load_task("piqa", "/nonexistent/micromix-data"), std::runtime_error);
}

TEST(EvalTasks, MakeDocEdgeCases) {
  // a single word: empty context (scored after the prefix token)
  TaskDoc one = make_doc("lambada_openai", nlohmann::json{{"text", "Word"}});
  expect_request(one.requests[0], "", " Word");
  // lambada splits on single spaces only, like Python's str.split(' ')
  TaskDoc two = make_doc("lambada_openai", nlohmann::json{{"text", "a b\nc  d"}});
  expect_request(two.requests[0], "a b\nc ", " d");
  // winogrande: the first blank, the rest stripped
  TaskDoc w = make_doc("winogrande", nlohmann::json{{"sentence", "X _  went_home. "},
                                                     {"option1", "A"}, {"option2", "B"}, {"answer", "2"}});
  expect_request(w.requests[0], "X A", " went_home.");
  expect_request(w.requests[1], "X B", " went_home.");
  EXPECT_EQ(w.gold, 1);
  // an answer key absent from the labels is refused (lm-eval's label.index raises too)
  nlohmann::json arc = nlohmann::json::parse(
      R"({"question":{"stem":"Q?","choices":[{"text":"x","label":"A"},{"text":"y","label":"B"}]},"answerKey":"E"})");
  EXPECT_THROW(make_doc("arc_easy", arc), std::runtime_error);
  arc["answerKey"] = "B";
  EXPECT_EQ(make_doc("arc_easy", arc).gold, 1);
  EXPECT_THROW(make_doc("piqa", nlohmann::json{{"goal", "g"}, {"sol1", "a"}, {"sol2", "b"}}, "2"),
               std::runtime_error);
}

TEST(EvalTasks, DataDirResolution) {
  EXPECT_EQ(resolve_data_dir("/some/where"), "/some/where");
  const char* old = std::getenv("MICROMIX_DATA");
  const std::string saved = old ? old : "";
  setenv("MICROMIX_DATA", "/from/env", 1);
  EXPECT_EQ(resolve_data_dir(""), "/from/env");
  EXPECT_EQ(resolve_data_dir("/option"), "/option");
  if (old) setenv("MICROMIX_DATA", saved.c_str(), 1);
  else unsetenv("MICROMIX_DATA");
}

// ---- metrics -----------------------------------------------------------------------

TEST(EvalMetrics, AccVersusAccNormByCharacterLength) {
  Task t;
  t.name = "toy";
  t.metrics = {"acc", "acc_norm"};
  auto doc = [](std::vector<std::string> choices, int gold) {
    TaskDoc d;
    d.choices = choices;
    for (const auto& c : choices) d.requests.push_back({"ctx", " " + c});
    d.gold = gold;
    return d;
  };
  t.docs.push_back(doc({"a", "bbbb"}, 1));         // acc picks 0, acc_norm picks 1
  t.docs.push_back(doc({"a", "bbbb"}, 0));         // same picks, other gold
  t.docs.push_back(doc({"xyz", "pq", "r"}, 2));    // both pick 2
  t.docs.push_back(doc({"\u00b0\u00b0", "abc"}, 1));  // 2 characters (4 bytes) vs 3
  const std::vector<LoglikelihoodResult> r{
      {-2.0, false}, {-4.0, false},                  // -2 > -4; -2/1 < -4/4
      {-2.0, false}, {-4.0, false},                  //
      {-9.0, false}, {-8.0, false}, {-1.0, true},    //
      {-2.2, false}, {-3.0, false},                  // per character: -1.1 < -1.0 (per byte -0.55 would win)
  };
  const auto m = aggregate(t, r);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0].name, "acc");
  // acc: 0, 1, 1, 0 ; acc_norm: 1, 0, 1, 1
  EXPECT_DOUBLE_EQ(m[0].value, 0.5);
  EXPECT_NEAR(m[0].std_err, std::sqrt(1.0 / 3.0) / 2.0, 1e-15);
  EXPECT_EQ(m[1].name, "acc_norm");
  EXPECT_DOUBLE_EQ(m[1].value, 0.75);
  EXPECT_NEAR(m[1].std_err, std::sqrt(0.25 / 1.0) / 2.0, 1e-15);  // sum sq dev 0.75, /3, sqrt, /2
  // ties go to the first choice, like numpy.argmax
  Task tie = t;
  tie.docs = {doc({"ab", "cd"}, 1)};
  const auto mt = aggregate(tie, std::vector<LoglikelihoodResult>{{-1.0, false}, {-1.0, false}});
  EXPECT_EQ(mt[0].value, 0.0);
  EXPECT_TRUE(std::isnan(mt[0].std_err));  // one doc: no sample stddev
  EXPECT_THROW(aggregate(t, std::vector<LoglikelihoodResult>(3)), std::invalid_argument);
}

TEST(EvalMetrics, LambadaPerplexityAndGreedyAcc) {
  Task t;
  t.name = "lambada_openai";
  t.output = TaskOutput::Loglikelihood;
  t.metrics = {"perplexity", "acc"};
  for (int i = 0; i < 4; ++i) {
    TaskDoc d;
    d.requests.push_back({"c", " w"});
    t.docs.push_back(d);
  }
  const std::vector<LoglikelihoodResult> r{{-1.0, true}, {-2.0, false}, {-0.5, true}, {-4.5, true}};
  const auto m = aggregate(t, r, 0);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0].name, "perplexity");
  EXPECT_NEAR(m[0].value, std::exp(2.0), 1e-12);
  EXPECT_TRUE(std::isnan(m[0].std_err));  // no bootstrap asked
  EXPECT_EQ(m[1].name, "acc");
  EXPECT_DOUBLE_EQ(m[1].value, 0.75);
  EXPECT_NEAR(m[1].std_err, 0.25, 1e-15);  // sqrt(0.75 / 3) / 2
}

TEST(EvalMetrics, PerplexityBootstrapMatchesLmEval) {
  // Expected values from lm-eval's bootstrap_stderr(perplexity, xs, iters) (Python's
  // random.Random(i).choices per chunk of 1000 resamples).
  std::vector<double> xs;
  for (int k = 0; k < 50; ++k) xs.push_back(-0.5 * (k % 7) - 0.1 * k);
  EXPECT_NEAR(perplexity_bootstrap_stderr(xs, 3000), 13.622236596152298, 1e-9);
  EXPECT_NEAR(perplexity_bootstrap_stderr(xs, 500), 13.956142940895893, 1e-9);
  EXPECT_TRUE(std::isnan(perplexity_bootstrap_stderr(xs, 0)));
}

// ---- tokenization of a request -----------------------------------------------------

namespace {

// Word pieces with the leading spaces attached, like SentencePiece: "a bc  d" ->
// "a", " bc", "  d"; whitespace other than ' ' is a piece of its own.
struct WordEncoder {
  std::map<std::string, int32_t> ids;
  std::vector<std::string> pieces;
  std::vector<int32_t> operator()(std::string_view s) {
    std::vector<int32_t> out;
    size_t i = 0;
    while (i < s.size()) {
      size_t j = i;
      while (j < s.size() && s[j] == ' ') ++j;
      if (j < s.size() && s[j] != ' ' && s[j] != '\n') {
        while (j < s.size() && s[j] != ' ' && s[j] != '\n') ++j;
      } else if (j < s.size() && j == i) {
        ++j;  // a lone '\n'
      }
      const std::string piece(s.substr(i, j - i));
      auto [it, added] = ids.emplace(piece, static_cast<int32_t>(pieces.size()) + 10);
      if (added) pieces.push_back(piece);
      out.push_back(it->second);
      i = j;
    }
    return out;
  }
  std::vector<std::string> text(const std::vector<int32_t>& t) const {
    std::vector<std::string> out;
    for (int32_t id : t) out.push_back(pieces[id - 10]);
    return out;
  }
};

}  // namespace

TEST(EvalEncodePair, TrailingContextWhitespaceMovesToTheContinuation) {
  WordEncoder enc;
  EncodeFn fn = [&](std::string_view s) { return enc(s); };
  auto [ctx, cont] = encode_pair(fn, "Question: why?\nAnswer: ", "because", 1);
  EXPECT_EQ(enc.text(ctx), (std::vector<std::string>{"Question:", " why?", "\n", "Answer:"}));
  EXPECT_EQ(enc.text(cont), (std::vector<std::string>{" because"}));
  // newlines and several spaces move too; whitespace inside the context stays
  auto [c2, k2] = encode_pair(fn, "a  b \n  ", "c", 1);
  EXPECT_EQ(enc.text(c2), (std::vector<std::string>{"a", "  b"}));
  EXPECT_EQ(enc.text(k2), (std::vector<std::string>{" ", "\n", "  c"}));
  // no trailing whitespace: the usual case
  auto [c3, k3] = encode_pair(fn, "The cat", " sat down", 1);
  EXPECT_EQ(enc.text(c3), (std::vector<std::string>{"The", " cat"}));
  EXPECT_EQ(enc.text(k3), (std::vector<std::string>{" sat", " down"}));
  // empty context: the prefix token
  auto [c4, k4] = encode_pair(fn, "", " word", 7);
  EXPECT_EQ(c4, std::vector<int32_t>{7});
  EXPECT_EQ(enc.text(k4), (std::vector<std::string>{" word"}));
  EXPECT_THROW(encode_pair(fn, "x", "", 1), std::invalid_argument);
}

TEST(EvalEncodePair, ContinuationIsTheTailOfTheWholeEncoding) {
  // A tokenizer whose pieces cross the boundary: greedy longest match over {ab, a, b, c, x}.
  EncodeFn fn = [](std::string_view s) {
    std::vector<int32_t> out;
    for (size_t i = 0; i < s.size();) {
      if (s.substr(i, 2) == "ab") {
        out.push_back(100);
        i += 2;
      } else {
        out.push_back(static_cast<unsigned char>(s[i]));
        ++i;
      }
    }
    return out;
  };
  auto [ctx, cont] = encode_pair(fn, "xa", "bc", 1);
  EXPECT_EQ(ctx, (std::vector<int32_t>{'x', 'a'}));
  EXPECT_EQ(cont, (std::vector<int32_t>{'c'}));  // whole = [x, ab, c], minus two context tokens
}

TEST(EvalEncodePair, PythonWhitespace) {
  EXPECT_EQ(trailing_whitespace_bytes("ab \t\n"), 3u);
  EXPECT_EQ(trailing_whitespace_bytes("ab\xc2\xa0"), 2u);           // U+00A0
  EXPECT_EQ(trailing_whitespace_bytes("ab\xe3\x80\x80 "), 4u);      // U+3000 + space
  EXPECT_EQ(trailing_whitespace_bytes("\xc2\xb0"), 0u);             // U+00B0 is not whitespace
  EXPECT_EQ(trailing_whitespace_bytes("   "), 3u);
  EXPECT_EQ(strip_whitespace("  \x1f a b \n"), "a b");
  EXPECT_EQ(strip_whitespace(""), "");
}

// ---- prefix-sharing scoring vs from scratch ----------------------------------------

namespace {

using model::LayerWeights;
using model::Linear;
using model::LinearSlot;
using model::ModelConfig;
using model::ModelWeights;

ModelWeights random_model(uint32_t seed) {
  ModelConfig c = model::small_config();
  c.vocab = 100;
  c.tied_embeddings = false;
  return model::random_model(c, seed);
}

// One token per character: ' ' -> 3 ... '~' -> 97, '\n' -> 98.
std::vector<int32_t> char_encode(std::string_view s) {
  std::vector<int32_t> out;
  for (char ch : s) out.push_back(ch == '\n' ? 98 : static_cast<int32_t>(static_cast<unsigned char>(ch)) - 32 + 3);
  return out;
}
char char_decode(int32_t id) { return id == 98 ? '\n' : static_cast<char>(id - 3 + 32); }

// From scratch with all logits of the whole (truncated) input, log-softmax in double.
LoglikelihoodResult reference_score(const ModelWeights& w, const LoglikelihoodRequest& r, int max_length,
                                    int32_t prefix) {
  auto [ctx, cont] = encode_pair(char_encode, r.context, r.continuation, prefix);
  std::vector<int32_t> all(ctx);
  all.insert(all.end(), cont.begin(), cont.end());
  if (all.size() > size_t(max_length) + 1) all.erase(all.begin(), all.end() - (max_length + 1));
  all.pop_back();
  model::CpuRuntime rt(w, max_length);
  const int V = w.config.vocab;
  std::vector<float> logits(all.size() * V);
  rt.forward(all, logits.data(), true);
  LoglikelihoodResult res{0.0, true};
  for (size_t t = 0; t < cont.size(); ++t) {
    const float* row = logits.data() + (all.size() - cont.size() + t) * V;
    double mx = row[0];
    int arg = 0;
    for (int v = 1; v < V; ++v)
      if (row[v] > mx) mx = row[arg = v];
    double s = 0;
    for (int v = 0; v < V; ++v) s += std::exp(row[v] - mx);
    res.logprob += row[cont[t]] - mx - std::log(s);
    if (arg != cont[t]) res.is_greedy = false;
  }
  return res;
}

}  // namespace

TEST(EvalCpuModel, PrefixSharingEqualsScoringFromScratch) {
  const ModelWeights w = random_model(7);
  const int max_length = 48;
  const int32_t prefix = 1;

  // A greedy continuation of "Question: 2+2\nAnswer:" so that is_greedy is exercised.
  std::string greedy;
  {
    model::CpuRuntime rt(w, max_length);
    auto toks = char_encode("Question: 2+2\nAnswer:");
    std::vector<float> logits(w.config.vocab);
    rt.forward(toks, logits.data(), false);
    for (int step = 0; step < 3; ++step) {
      int arg = 0;
      for (int v = 1; v < w.config.vocab; ++v)
        if (logits[v] > logits[arg]) arg = v;
      if (arg < 3 || arg > 98) arg = 3;
      greedy.push_back(char_decode(arg));
      const int32_t t = arg;
      rt.forward(std::span<const int32_t>(&t, 1), logits.data(), false);
    }
  }

  const std::string q = "Question: 2+2\nAnswer:";
  std::vector<LoglikelihoodRequest> requests{
      {q, " 4"}, {q, " four"}, {q, " 22, or so"}, {q, greedy},         // shared context
      {"Sarah told Maria so Sarah", " left."},                         // winogrande-style:
      {"Sarah told Maria so Maria", " left."},                         // same continuation
      {"", " Word"},                                                   // prefix token
      {"Tail spaces  ", "x y"},                                        // whitespace moves
      {std::string(70, 'a') + " long context truncated", " on the left"},  // > max_length
      {std::string(70, 'a') + " long context truncated", " elsewhere"},
      {q, " 4"},                                                       // duplicate
      {"Q", std::string(40, 'z')},                                     // long continuation
  };
  CpuLanguageModel shared(w, char_encode, prefix, {}, max_length, true);
  CpuLanguageModel scratch(w, char_encode, prefix, {}, max_length, false);
  size_t calls = 0, last_done = 0;
  const auto a = shared.loglikelihood(requests, [&](size_t done, size_t total) {
    ++calls;
    last_done = done;
    EXPECT_EQ(total, requests.size());
  });
  const auto b = scratch.loglikelihood(requests, {});
  EXPECT_EQ(calls, requests.size());
  EXPECT_EQ(last_done, requests.size());
  ASSERT_EQ(a.size(), requests.size());
  ASSERT_EQ(b.size(), requests.size());
  int greedy_count = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto ref = reference_score(w, requests[i], max_length, prefix);
    EXPECT_NEAR(a[i].logprob, ref.logprob, 1e-4) << i;
    EXPECT_NEAR(b[i].logprob, ref.logprob, 1e-4) << i;
    EXPECT_EQ(a[i].is_greedy, ref.is_greedy) << i;
    EXPECT_EQ(b[i].is_greedy, ref.is_greedy) << i;
    EXPECT_LT(a[i].logprob, 0.0);
    greedy_count += a[i].is_greedy;
  }
  EXPECT_TRUE(a[3].is_greedy);
  EXPECT_NEAR(a[0].logprob, a[10].logprob, 1e-5);
  EXPECT_GE(greedy_count, 1);
  EXPECT_LT(shared.last_tokens_run(), scratch.last_tokens_run());
}

// NaN in the model (here put in after any load-time check) makes perplexity and the
// log-likelihoods stop with a message instead of reporting NaN or accuracies of NaN logits.
TEST(EvalCpuModel, NonFiniteLogitsAreAnErrorNotAScore) {
  ModelWeights w = random_model(9);
  EXPECT_NO_THROW(w.check_finite("model"));
  w.layers[1].slot(LinearSlot::Down).weight[5] = NAN;
  EXPECT_THROW(w.check_finite("model"), FormatError);
  std::vector<int32_t> text;
  for (int i = 0; i < 64; ++i) text.push_back(3 + (i * 7) % 90);
  model::CpuRuntime rt(w, 32);
  try {
    perplexity(rt, text, 16, 0, {});
    ADD_FAILURE() << "perplexity of a NaN model";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not finite"), std::string::npos) << e.what();
  }
  CpuLanguageModel lm(w, char_encode, 1, {}, 32);
  EXPECT_THROW(lm.loglikelihood({{"Question: 2+2\nAnswer:", " 4"}}, {}), std::runtime_error);
}

TEST(EvalCpuModel, ActivationHookAppliesToEveryRequest) {
  const ModelWeights w = random_model(11);
  std::vector<LoglikelihoodRequest> requests{{"Question: a\nAnswer:", " yes"}, {"Question: a\nAnswer:", " no"}};
  // a hook that rounds activations coarsely changes the scores, identically with sharing or not
  model::LinearInputHook hook = [](int, model::LinearSlot, float* x, int64_t tokens, int64_t in) {
    for (int64_t i = 0; i < tokens * in; ++i) x[i] = std::round(x[i] * 4.0f) / 4.0f;
  };
  CpuLanguageModel plain(w, char_encode, 1, {}, 64);
  CpuLanguageModel shared(w, char_encode, 1, hook, 64, true);
  CpuLanguageModel scratch(w, char_encode, 1, hook, 64, false);
  const auto p = plain.loglikelihood(requests, {});
  const auto a = shared.loglikelihood(requests, {});
  const auto b = scratch.loglikelihood(requests, {});
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_NEAR(a[i].logprob, b[i].logprob, 1e-4);
    EXPECT_GT(std::abs(a[i].logprob - p[i].logprob), 1e-3);
  }
}

TEST(EvalCpuModel, RunTasksReportsMetricsCountsAndTime) {
  REQUIRE_DATA(dir);
  const ModelWeights w = random_model(3);
  // Non-ASCII and characters outside the toy alphabet map to spaces.
  EncodeFn enc = [](std::string_view s) {
    std::vector<int32_t> out;
    for (char ch : s) {
      const auto u = static_cast<unsigned char>(ch);
      out.push_back(u >= 32 && u < 127 ? int32_t(u) - 32 + 3 : 3);
    }
    return out;
  };
  CpuLanguageModel lm(w, enc, 1, {}, 256);
  std::vector<std::string> seen;
  const auto j = run_tasks(lm, {"piqa", "lambada_openai", "winogrande"}, dir, 3,
                           [&](const std::string& task, size_t done, size_t total) {
                             if (done == total) seen.push_back(task);
                           },
                           200);
  EXPECT_EQ(seen, (std::vector<std::string>{"piqa", "lambada_openai", "winogrande"}));
  const auto& r = j.at("results");
  EXPECT_EQ(r.at("piqa").at("docs"), 3);
  EXPECT_EQ(r.at("piqa").at("requests"), 6);
  EXPECT_TRUE(r.at("piqa").contains("acc_norm"));
  EXPECT_TRUE(r.at("piqa").contains("acc_norm_stderr"));
  EXPECT_GE(r.at("piqa").at("seconds").get<double>(), 0.0);
  EXPECT_GT(r.at("lambada_openai").at("perplexity").get<double>(), 1.0);
  EXPECT_GT(r.at("lambada_openai").at("perplexity_stderr").get<double>(), 0.0);
  EXPECT_FALSE(r.at("winogrande").contains("acc_norm"));
  EXPECT_EQ(j.at("limit"), 3);
  seen.clear();
  EXPECT_THROW(run_tasks(lm, {"piqa", "hellaswag"}, dir, 1,
                         [&](const std::string& task, size_t, size_t) { seen.push_back(task); }),
               std::invalid_argument);
  EXPECT_TRUE(seen.empty());
}

TEST(EvalCpuModel, RuntimeTruncateAndLastLogits) {
  const ModelWeights w = random_model(5);
  const int V = w.config.vocab;
  const std::vector<int32_t> toks{5, 9, 14, 2, 77, 31, 8};
  model::CpuRuntime rt(w, 16);
  std::vector<float> all(toks.size() * V), last(3 * V), again(3 * V);
  rt.forward(toks, all.data(), true);
  rt.reset();
  rt.forward_last(toks, last.data(), 3);
  for (int i = 0; i < 3 * V; ++i) EXPECT_NEAR(last[i], all[(toks.size() - 3) * V + i], 1e-4);
  // rewind to 4 tokens and run the same tail again from the cache
  rt.truncate(4);
  EXPECT_EQ(rt.position(), 4);
  rt.forward_last(std::span<const int32_t>(toks).subspan(4), again.data(), 3);
  for (int i = 0; i < 3 * V; ++i) EXPECT_NEAR(again[i], all[(toks.size() - 3) * V + i], 1e-4);
  EXPECT_EQ(rt.position(), 7);
  EXPECT_THROW(rt.truncate(8), std::out_of_range);
  EXPECT_THROW(rt.truncate(-1), std::out_of_range);
  EXPECT_THROW(rt.forward_last(toks, last.data(), 8), std::out_of_range);
}
