#include "cli.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace micromix::cli {

std::vector<CommandSpec>& registry() {
  static std::vector<CommandSpec> commands;
  return commands;
}

namespace {
const OptionSpec* find_option(const CommandSpec& spec, const std::string& name) {
  for (const auto& o : spec.options)
    if (o.name == name) return &o;
  return nullptr;
}
}  // namespace

bool ParsedArgs::flag(const std::string& name) const {
  auto it = values.find(name);
  return it != values.end() && it->second == "1";
}

bool ParsedArgs::given(const std::string& name) const { return values.count(name) != 0; }

const std::string& ParsedArgs::str(const std::string& name) const {
  auto it = values.find(name);
  if (it == values.end()) throw std::logic_error("option --" + name + " is not declared");
  return it->second;
}

int64_t ParsedArgs::integer(const std::string& name) const {
  const std::string& s = str(name);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0) throw UsageError("--" + name + " expects an integer, got '" + s + "'");
  return v;
}

double ParsedArgs::number(const std::string& name) const {
  const std::string& s = str(name);
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno != 0) throw UsageError("--" + name + " expects a number, got '" + s + "'");
  if (!std::isfinite(v)) throw UsageError("--" + name + " expects a finite number, got '" + s + "'");
  return v;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

ParsedArgs parse_args(const CommandSpec& spec, int argc, char** argv) {
  ParsedArgs out;
  for (const auto& o : spec.options)
    if (!o.value_name.empty() && !o.default_value.empty()) out.values[o.name] = o.default_value;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a.size() > 2 && a.rfind("--", 0) == 0) {
      std::string name = a.substr(2), value;
      const auto eq = name.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      const OptionSpec* o = find_option(spec, name);
      if (!o) throw UsageError("unknown option --" + name + " (see 'micromix " + spec.name + " --help')");
      if (o->value_name.empty()) {
        if (inline_value) throw UsageError("--" + name + " takes no value");
        out.values[name] = "1";
      } else {
        if (!inline_value) {
          if (i + 1 >= argc) throw UsageError("--" + name + " needs a value " + o->value_name);
          value = argv[++i];
        }
        out.values[name] = value;
      }
    } else if (a == "-o") {
      if (!find_option(spec, "output")) throw UsageError("unknown option -o");
      if (i + 1 >= argc) throw UsageError("-o needs a file name");
      out.values["output"] = argv[++i];
    } else {
      out.positional.push_back(a);
    }
  }
  return out;
}

std::string command_help(const CommandSpec& spec) {
  std::ostringstream s;
  s << "usage: micromix " << spec.name << " " << spec.usage << "\n\n" << spec.summary << "\n";
  if (!spec.description.empty()) s << "\n" << spec.description << "\n";
  if (!spec.options.empty()) s << "\noptions:\n";
  for (const auto& o : spec.options) {
    std::string left = "  --" + o.name + (o.value_name.empty() ? "" : " " + o.value_name);
    if (o.name == "output") left = "  -o, --output " + o.value_name;
    s << left;
    s << std::string(left.size() < 28 ? 28 - left.size() : 1, ' ') << o.help;
    if (!o.default_value.empty() && !o.value_name.empty()) s << " (default: " << o.default_value << ")";
    s << "\n";
  }
  return s.str();
}

void progress(const std::string& line) {
  static const bool tty = isatty(STDERR_FILENO);
  if (tty)
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
  else
    std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

void progress_done() {
  static const bool tty = isatty(STDERR_FILENO);
  if (tty) std::fprintf(stderr, "\n");
}

}  // namespace micromix::cli
