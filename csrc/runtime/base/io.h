// File helpers shared by the loaders: whole-file reads and read-only memory maps, with errors
// that name the path. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mage::runtime {

std::string read_file(const std::string& path);     // throws std::runtime_error if unreadable
bool file_exists(const std::string& path);          // a regular file
bool dir_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);

// A whole file mapped read-only (MAP_PRIVATE): pages are read from the page cache on first
// touch and leave the process when the map is destroyed, so a loader that maps one shard at a
// time holds at most one shard's pages. Move-only.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the pages of [offset, offset + length) from the process (they stay in the page cache):
  // a loader calls it for bytes it has copied out.
  void release(uint64_t offset, uint64_t length) const;

 private:
  void reset();
  std::string path_;
  unsigned char* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace mage::runtime
