// Settings read from environment variables, for timing one kernel or schedule against another
// with one binary. env_choice: unset gives `automatic`, a name not among `choices` a warning
// and `automatic` too. env_switch: on unless the variable is "0".
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace micromix::cuda {

template <typename E, std::size_t N>
E env_choice(const char* var, const std::pair<const char*, E> (&choices)[N], E automatic, const char* what) {
  const char* v = std::getenv(var);
  if (v == nullptr) return automatic;
  std::string names;
  for (std::size_t i = 0; i < N; ++i) {
    if (std::strcmp(v, choices[i].first) == 0) return choices[i].second;
    names += (i == 0 ? "" : i + 1 == N ? " or " : ", ") + std::string(choices[i].first);
  }
  std::fprintf(stderr, "micromix: %s=%s is not %s; choosing the %s automatically\n", var, v, names.c_str(), what);
  return automatic;
}

inline bool env_switch(const char* var) {
  const char* v = std::getenv(var);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace micromix::cuda
