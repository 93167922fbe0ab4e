#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "cli.h"

using namespace micromix::cli;

static void print_overview() {
  std::printf(
      "micromix: mixed-precision MXFP4/MXFP6/MXFP8 post-training quantization for LLMs\n\n"
      "usage: micromix COMMAND [options]\n\ncommands:\n");
  auto commands = registry();
  std::sort(commands.begin(), commands.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  for (const auto& c : commands) std::printf("  %-12s %s\n", c.name.c_str(), c.summary.c_str());
  std::printf("\n'micromix COMMAND --help' describes a command.\n");
}

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_overview();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  for (const auto& spec : registry()) {
    if (spec.name != name) continue;
    for (int i = 2; i < argc; ++i)
      if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
        std::fputs(command_help(spec).c_str(), stdout);
        return 0;
      }
    try {
      return spec.run(parse_args(spec, argc - 2, argv + 2));
    } catch (const UsageError& e) {
      std::fprintf(stderr, "micromix %s: %s\n", name.c_str(), e.what());
      return 2;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "micromix %s: error: out of memory (the model or the requested context needs more)\n",
                   name.c_str());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "micromix %s: error: %s\n", name.c_str(), e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "micromix: unknown command '%s' (see 'micromix --help')\n", name.c_str());
  return 2;
}
