// Running the micromix command from tests.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

struct CliResult {
  int status;       // exit code
  std::string out;  // stdout and stderr together
};

// Runs `micromix ARGS`, with `input` on stdin when given.
inline CliResult run_micromix(const std::string& args, const std::string* input = nullptr) {
  std::string cmd = std::string(MICROMIX_BINARY) + " " + args;
  char path[] = "/tmp/micromix_cli_XXXXXX";
  if (input) {
    const int fd = mkstemp(path);
    FILE* f = fdopen(fd, "w");
    std::fputs(input->c_str(), f);
    std::fclose(f);
    cmd += std::string(" < ") + path;
  }
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  if (input) std::remove(path);
  return {WEXITSTATUS(status), out};
}
