#include "micromix/eval/tasks.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>

namespace micromix::eval {

namespace fs = std::filesystem;

std::string resolve_data_dir(const std::string& option_value) {
  if (!option_value.empty()) return option_value;
  if (const char* env = std::getenv("MICROMIX_DATA"); env && *env) return env;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path candidate = exe.parent_path() / ".." / ".." / "shared" / "data";
    if (fs::is_directory(candidate, ec)) return fs::weakly_canonical(candidate, ec).string();
  }
  return (fs::path("..") / "shared" / "data").string();
}

namespace {

const std::string kLambada = "lambada_openai", kPiqa = "piqa", kArcEasy = "arc_easy", kArcChallenge = "arc_challenge",
                  kWinogrande = "winogrande";

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) lines.push_back(std::move(line));
  }
  return lines;
}

const std::string& get_string(const nlohmann::json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j.at(key).is_string())
    throw std::runtime_error(std::string("record without a string field \"") + key + "\"");
  return j.at(key).get_ref<const std::string&>();
}

// Code points, as Python's len() counts a str.
double char_length(const std::string& s) {
  double n = 0;
  for (unsigned char c : s)
    if ((c & 0xc0) != 0x80) n += 1;
  return n;
}

// Python's random module: MT19937 seeded with init_by_array, random() of 53 bits.
class PyRandom {
 public:
  explicit PyRandom(uint64_t seed) {
    std::array<uint32_t, 2> key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    const size_t key_len = key[1] ? 2 : 1;
    mt_[0] = 19650218u;
    for (int i = 1; i < kN; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + static_cast<uint32_t>(i);
    size_t i = 1, j = 0;
    for (size_t k = std::max<size_t>(kN, key_len); k; --k) {
      mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + static_cast<uint32_t>(j);
      ++i;
      ++j;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
      if (j >= key_len) j = 0;
    }
    for (size_t k = kN - 1; k; --k) {
      mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - static_cast<uint32_t>(i);
      ++i;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
    }
    mt_[0] = 0x80000000u;
    index_ = kN;
  }

  uint32_t next_u32() {
    if (index_ >= kN) {
      auto twist = [this](int k, int k1, int km) {
        const uint32_t y = (mt_[k] & 0x80000000u) | (mt_[k1] & 0x7fffffffu);
        mt_[k] = mt_[km] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
      };
      int k = 0;
      for (; k < kN - kM; ++k) twist(k, k + 1, k + kM);
      for (; k < kN - 1; ++k) twist(k, k + 1, k + kM - kN);
      twist(kN - 1, 0, kM - 1);
      index_ = 0;
    }
    uint32_t y = mt_[index_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
  }

  double random() {
    const uint32_t a = next_u32() >> 5, b = next_u32() >> 6;
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
  }

 private:
  static constexpr int kN = 624, kM = 397;
  std::array<uint32_t, kN> mt_{};
  int index_ = kN;
};

double mean_of(std::span<const double> xs) {
  double s = 0;
  for (double x : xs) s += x;
  return s / static_cast<double>(xs.size());
}

double sample_stddev(std::span<const double> xs) {
  if (xs.size() < 2) return std::numeric_limits<double>::quiet_NaN();
  const double mu = mean_of(xs);
  double ss = 0;
  for (double x : xs) ss += (x - mu) * (x - mu);
  return std::sqrt(ss / static_cast<double>(xs.size() - 1));
}

double mean_stderr(std::span<const double> xs) {
  return sample_stddev(xs) / std::sqrt(static_cast<double>(xs.size()));
}

// numpy.argmax: the first maximum, a NaN counting as the maximum.
size_t argmax(const std::vector<double>& v) {
  size_t best = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (std::isnan(v[i])) return i;
    if (v[i] > v[best]) best = i;
  }
  return best;
}

}  // namespace

const std::vector<std::string>& supported_tasks() {
  static const std::vector<std::string> names{kLambada, kPiqa, kArcEasy, kArcChallenge, kWinogrande};
  return names;
}

std::vector<LoglikelihoodRequest> Task::requests() const {
  std::vector<LoglikelihoodRequest> out;
  out.reserve(request_count());
  for (const auto& d : docs) out.insert(out.end(), d.requests.begin(), d.requests.end());
  return out;
}

size_t Task::request_count() const {
  size_t n = 0;
  for (const auto& d : docs) n += d.requests.size();
  return n;
}

TaskDoc make_doc(const std::string& task, const nlohmann::json& record, const std::string& label) {
  TaskDoc doc;
  if (task == kLambada) {
    // doc_to_text: text.split(' ')[:-1] | join(' '); doc_to_target: ' ' + text.split(' ')[-1]
    const std::string& text = get_string(record, "text");
    const size_t cut = text.rfind(' ');
    const std::string context = cut == std::string::npos ? std::string() : text.substr(0, cut);
    const std::string target = " " + (cut == std::string::npos ? text : text.substr(cut + 1));
    doc.requests.push_back({context, target});
  } else if (task == kPiqa) {
    // "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label, delimiter " "
    const std::string context = "Question: " + get_string(record, "goal") + "\nAnswer:";
    doc.choices = {get_string(record, "sol1"), get_string(record, "sol2")};
    for (const auto& c : doc.choices) doc.requests.push_back({context, " " + c});
    if (label == "0" || label == "1") doc.gold = label == "0" ? 0 : 1;
    else throw std::runtime_error("piqa label \"" + label + "\" is not 0 or 1");
  } else if (task == kArcEasy || task == kArcChallenge) {
    // "Question: {{question}}\nAnswer:", choices choices.text,
    // target choices.label.index(answerKey), delimiter " "
    if (!record.contains("question") || !record.at("question").is_object())
      throw std::runtime_error("ARC record without a question object");
    const auto& q = record.at("question");
    const std::string context = "Question: " + get_string(q, "stem") + "\nAnswer:";
    if (!q.contains("choices") || !q.at("choices").is_array()) throw std::runtime_error("ARC record without choices");
    const std::string& key = get_string(record, "answerKey");
    for (const auto& c : q.at("choices")) {
      if (get_string(c, "label") == key && doc.gold < 0) doc.gold = static_cast<int>(doc.choices.size());
      doc.choices.push_back(get_string(c, "text"));
    }
    // lm-eval's choices.label.index(answerKey) raises here too: no right answer to score.
    if (doc.gold < 0) throw std::runtime_error("ARC answerKey \"" + key + "\" is not one of the choices' labels");
    for (const auto& c : doc.choices) doc.requests.push_back({context, " " + c});
  } else if (task == kWinogrande) {
    // partial scoring: contexts sentence[:idx] + option, continuation ' ' + the rest of
    // the sentence after the blank (stripped); gold from answer "1"/"2"
    const std::string& sentence = get_string(record, "sentence");
    const size_t idx = sentence.find('_');
    if (idx == std::string::npos) throw std::runtime_error("winogrande sentence without a blank");
    const std::string target(strip_whitespace(std::string_view(sentence).substr(idx + 1)));
    doc.choices = {sentence.substr(0, idx) + get_string(record, "option1"),
                   sentence.substr(0, idx) + get_string(record, "option2")};
    for (const auto& c : doc.choices) doc.requests.push_back({c, " " + target});
    const std::string& answer = get_string(record, "answer");
    if (answer == "1" || answer == "2") doc.gold = answer == "1" ? 0 : 1;
    else throw std::runtime_error("winogrande answer \"" + answer + "\" is not 1 or 2");
  } else {
    throw std::invalid_argument("unknown task \"" + task + "\"");
  }
  return doc;
}

Task load_task(const std::string& name, const std::string& data_dir, int64_t limit) {
  Task task;
  task.name = name;
  const fs::path dir(data_dir);
  fs::path data_file, label_file;
  if (name == kLambada) {
    task.output = TaskOutput::Loglikelihood;
    task.metrics = {"perplexity", "acc"};
    data_file = dir / "lambada" / "lambada_test.jsonl";
  } else if (name == kPiqa) {
    task.metrics = {"acc", "acc_norm"};
    data_file = dir / "piqa" / "valid.jsonl";
    label_file = dir / "piqa" / "valid-labels.lst";
  } else if (name == kArcEasy) {
    task.metrics = {"acc", "acc_norm"};
    data_file = dir / "arc" / "ARC-Easy-Test.jsonl";
  } else if (name == kArcChallenge) {
    task.metrics = {"acc", "acc_norm"};
    data_file = dir / "arc" / "ARC-Challenge-Test.jsonl";
  } else if (name == kWinogrande) {
    task.metrics = {"acc"};
    data_file = dir / "winogrande" / "dev.jsonl";
  } else {
    throw std::invalid_argument("unknown task \"" + name + "\"");
  }
  const auto lines = read_lines(data_file);
  std::vector<std::string> labels;
  if (!label_file.empty()) {
    labels = read_lines(label_file);
    if (labels.size() != lines.size())
      throw std::runtime_error(label_file.string() + " has " + std::to_string(labels.size()) + " labels for " +
                               std::to_string(lines.size()) + " records");
  }
  const size_t n = limit >= 0 ? std::min(lines.size(), static_cast<size_t>(limit)) : lines.size();
  task.docs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    try {
      const auto record = nlohmann::json::parse(lines[i]);
      task.docs.push_back(make_doc(name, record, labels.empty() ? std::string() : labels[i]));
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(data_file.string() + " line " + std::to_string(i + 1) + ": " + e.what());
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(data_file.string() + " line " + std::to_string(i + 1) + ": " + e.what());
    }
  }
  return task;
}

double perplexity_bootstrap_stderr(std::span<const double> lls, int64_t iters) {
  if (iters <= 0 || lls.empty()) return std::numeric_limits<double>::quiet_NaN();
  // lm-eval: chunks of min(1000, iters) resamples, chunk i drawn from random.Random(i)
  // by rnd.choices(xs, k=len(xs)), i.e. xs[floor(random() * n)].
  const int64_t chunk = std::min<int64_t>(1000, iters), n_chunks = iters / chunk;
  std::vector<double> res(static_cast<size_t>(n_chunks * chunk));
  const double n = static_cast<double>(lls.size());
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < n_chunks; ++c) {
    PyRandom rnd(static_cast<uint64_t>(c));
    for (int64_t r = 0; r < chunk; ++r) {
      double s = 0;
      for (size_t k = 0; k < lls.size(); ++k) s += lls[static_cast<size_t>(std::floor(rnd.random() * n))];
      res[static_cast<size_t>(c * chunk + r)] = std::exp(-(s / n));
    }
  }
  return sample_stddev(res);
}

std::vector<MetricValue> aggregate(const Task& task, std::span<const LoglikelihoodResult> results,
                                   int64_t bootstrap_iters) {
  if (results.size() != task.request_count())
    throw std::invalid_argument(task.name + ": " + std::to_string(results.size()) + " results for " +
                                std::to_string(task.request_count()) + " requests");
  std::vector<double> acc, acc_norm, lls;
  size_t at = 0;
  for (const auto& doc : task.docs) {
    const auto r = results.subspan(at, doc.requests.size());
    at += doc.requests.size();
    if (task.output == TaskOutput::Loglikelihood) {
      lls.push_back(r[0].logprob);
      acc.push_back(r[0].is_greedy ? 1.0 : 0.0);
      continue;
    }
    std::vector<double> ll(r.size()), normed(r.size());
    for (size_t i = 0; i < r.size(); ++i) {
      ll[i] = r[i].logprob;
      normed[i] = r[i].logprob / char_length(doc.choices[i]);
    }
    acc.push_back(doc.gold >= 0 && argmax(ll) == static_cast<size_t>(doc.gold) ? 1.0 : 0.0);
    acc_norm.push_back(doc.gold >= 0 && argmax(normed) == static_cast<size_t>(doc.gold) ? 1.0 : 0.0);
  }
  std::vector<MetricValue> out;
  for (const auto& m : task.metrics) {
    if (m == "acc") out.push_back({m, mean_of(acc), mean_stderr(acc)});
    else if (m == "acc_norm") out.push_back({m, mean_of(acc_norm), mean_stderr(acc_norm)});
    else if (m == "perplexity")
      out.push_back({m, std::exp(-mean_of(lls)), perplexity_bootstrap_stderr(lls, bootstrap_iters)});
  }
  return out;
}

nlohmann::json run_tasks(LanguageModel& model, const std::vector<std::string>& task_names, const std::string& data_dir,
                         int64_t limit, TaskProgressFn progress, int64_t bootstrap_iters) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto& known = supported_tasks();
  for (const auto& name : task_names)  // fail before any scoring starts
    if (std::find(known.begin(), known.end(), name) == known.end())
      throw std::invalid_argument("unknown task \"" + name + "\"");
  nlohmann::json results = nlohmann::json::object();
  for (const auto& name : task_names) {
    const auto t0 = clock::now();
    const Task task = load_task(name, data_dir, limit);
    const auto requests = task.requests();
    ProgressFn report;
    if (progress) report = [&](size_t done, size_t total) { progress(name, done, total); };
    const auto scores = model.loglikelihood(requests, report);
    const auto metrics = aggregate(task, scores, bootstrap_iters);
    nlohmann::json entry = nlohmann::json::object();
    for (const auto& m : metrics) {
      entry[m.name] = m.value;
      entry[m.name + "_stderr"] = std::isnan(m.std_err) ? nlohmann::json(nullptr) : nlohmann::json(m.std_err);
    }
    entry["docs"] = task.docs.size();
    entry["requests"] = requests.size();
    entry["seconds"] = std::chrono::duration<double>(clock::now() - t0).count();
    results[name] = std::move(entry);
  }
  return {{"results", std::move(results)},
          {"limit", limit},
          {"seconds", std::chrono::duration<double>(clock::now() - start).count()}};
}

}  // namespace micromix::eval
