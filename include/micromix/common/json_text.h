// JSON as text, for files and command output.
#pragma once

#include <string>

namespace micromix {

// Text that is not valid UTF-8 (generated text cut inside a character, a name or path in
// another encoding) becomes U+FFFD instead of failing the whole dump. For nlohmann::json and
// ordered_json alike; indent -1 is one line.
template <class Json>
std::string json_text(const Json& j, int indent = 2) {
  return j.dump(indent, ' ', false, Json::error_handler_t::replace);
}

}  // namespace micromix
