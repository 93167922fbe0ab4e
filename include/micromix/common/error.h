#pragma once

#include <stdexcept>
#include <string>

namespace micromix {

// A file or input that does not follow its format (truncated, crafted, inconsistent).
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace micromix
