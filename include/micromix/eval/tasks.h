// Zero-shot tasks scored as lm-evaluation-harness 0.4 scores them: lambada_openai,
// piqa, arc_easy, arc_challenge and winogrande, read from the micromix data folder
// (see docs/tasks.md for the templates and metrics).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "micromix/eval/harness.h"

namespace micromix::eval {

// The data folder: option_value when non-empty, else $MICROMIX_DATA, else
// <folder of the running executable>/../../shared/data when it exists, else
// ../shared/data (relative to the working directory).
std::string resolve_data_dir(const std::string& option_value = "");

enum class TaskOutput {
  Loglikelihood,   // one request per doc (lambada_openai)
  MultipleChoice,  // one request per choice
};

struct TaskDoc {
  std::vector<LoglikelihoodRequest> requests;
  std::vector<std::string> choices;  // the doc's choices as lm-eval lists them (acc_norm lengths)
  int gold = -1;                     // index of the right choice (-1 only before make_doc sets it)
};

struct Task {
  std::string name;
  TaskOutput output = TaskOutput::MultipleChoice;
  std::vector<std::string> metrics;  // in report order: "acc", "acc_norm", "perplexity"
  std::vector<TaskDoc> docs;

  // All docs' requests, doc after doc, choices in order.
  std::vector<LoglikelihoodRequest> requests() const;
  size_t request_count() const;
};

// Names accepted by load_task, in the default evaluation order.
const std::vector<std::string>& supported_tasks();

// Reads a task's docs from data_dir; limit >= 0 keeps the first `limit` docs.
// Throws std::invalid_argument for an unknown name, std::runtime_error for unreadable
// or malformed data.
Task load_task(const std::string& name, const std::string& data_dir, int64_t limit = -1);

// One doc from its raw record (a JSON line of the data file); `label` is the line of
// the separate label file where the task has one (piqa), else ignored.
TaskDoc make_doc(const std::string& task, const nlohmann::json& record, const std::string& label = "");

struct MetricValue {
  std::string name;
  double value = 0.0;
  double std_err = 0.0;  // NaN where lm-eval has none (fewer than two docs)
};

// Aggregates results (task.requests() order) into the task's metrics:
// acc / acc_norm: mean over docs, stderr = sample stddev / sqrt(n);
// perplexity: exp(-mean loglikelihood), stderr by lm-eval's bootstrap (Python's
// Mersenne Twister seeded 0, 1, ... per 1000 resamples; bootstrap_iters <= 0: NaN).
std::vector<MetricValue> aggregate(const Task& task, std::span<const LoglikelihoodResult> results,
                                   int64_t bootstrap_iters = 100000);

// lm-eval's bootstrap stderr of the perplexity aggregation over per-doc loglikelihoods.
double perplexity_bootstrap_stderr(std::span<const double> loglikelihoods, int64_t iters);

using TaskProgressFn = std::function<void(const std::string& task, size_t done, size_t total)>;

// Loads, scores and aggregates each task (std::invalid_argument up front for an unknown
// name). Returns
// {"results": {task: {"acc": .., "acc_stderr": .., ..., "docs": n, "requests": m,
//  "seconds": s}}, "limit": limit, "seconds": total}.
nlohmann::json run_tasks(LanguageModel& model, const std::vector<std::string>& task_names, const std::string& data_dir,
                         int64_t limit, TaskProgressFn progress, int64_t bootstrap_iters = 100000);

}  // namespace micromix::eval
