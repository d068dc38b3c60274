// llamac replacement for TVM's src/support/bytes_io.h: streams over in-memory byte buffers.
#ifndef TVM_SUPPORT_BYTES_IO_H_
#define TVM_SUPPORT_BYTES_IO_H_

#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

// Reads from a buffer the caller keeps alive (or from an ffi::Bytes it holds a reference to).
class BytesInStream : public Stream {
 public:
  explicit BytesInStream(const std::string& data) : data_(data.data()), size_(data.size()) {}
  explicit BytesInStream(const ffi::Bytes& data)
      : owner_(data), data_(owner_.data()), size_(owner_.size()) {}
  BytesInStream(const void* data, size_t size)
      : data_(static_cast<const char*>(data)), size_(size) {}

  using Stream::Read;
  using Stream::Write;

  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, size_ - pos_);
    if (n != 0) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }  // read-only

  size_t Tell() const { return pos_; }
  void Seek(size_t pos) { pos_ = std::min(pos, size_); }

 private:
  ffi::Bytes owner_;
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Appends everything written to a std::string owned by the caller.
class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* out) : out_(out) {}

  using Stream::Read;
  using Stream::Write;

  size_t Read(void*, size_t) final { return 0; }  // write-only
  size_t Write(const void* ptr, size_t size) final {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BYTES_IO_H_
