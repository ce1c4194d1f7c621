// File helpers shared by the loaders: whole-file reads with errors that name the path.
#pragma once

#include <string>

namespace mage::runtime {

std::string read_file(const std::string& path);     // throws std::runtime_error if unreadable
bool file_exists(const std::string& path);          // a regular file
bool dir_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);

}  // namespace mage::runtime
