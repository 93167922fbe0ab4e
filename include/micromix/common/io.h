#pragma once

#include <string>

namespace micromix {

// Writes a file through a temporary in the same folder and a rename, so a crash
// leaves either the old file or the complete new one.
void write_file_atomic(const std::string& path, const std::string& contents);
std::string read_file(const std::string& path);  // throws std::runtime_error naming the file

}  // namespace micromix
