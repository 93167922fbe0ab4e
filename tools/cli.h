// The micromix command line: a registry of subcommands with declared options, so
// every subcommand gets the same parsing, --help and error handling.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "micromix/common/json_text.h"

namespace micromix::cli {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct OptionSpec {
  std::string name;           // without the leading "--"
  std::string value_name;     // empty: a flag that takes no value
  std::string default_value;  // shown in --help and returned when absent
  std::string help;
};

class ParsedArgs {
 public:
  std::vector<std::string> positional;

  bool flag(const std::string& name) const;
  bool given(const std::string& name) const;
  const std::string& str(const std::string& name) const;
  int64_t integer(const std::string& name) const;
  double number(const std::string& name) const;

  std::map<std::string, std::string> values;
};

struct CommandSpec {
  std::string name;
  std::string summary;
  std::string usage;        // e.g. "[options] FILE"
  std::string description;  // extra paragraphs for --help
  std::vector<OptionSpec> options;
  int (*run)(const ParsedArgs& args) = nullptr;
};

std::vector<CommandSpec>& registry();

struct RegisterCommand {
  explicit RegisterCommand(CommandSpec spec) { registry().push_back(std::move(spec)); }
};

// "a,b,,c" -> {"a", "b", "c"}: the value of a list option.
std::vector<std::string> split_list(const std::string& s);

ParsedArgs parse_args(const CommandSpec& spec, int argc, char** argv);
std::string command_help(const CommandSpec& spec);

// A single-line progress display on stderr, redrawn in place when stderr is a terminal.
void progress(const std::string& line);
void progress_done();

}  // namespace micromix::cli
