// llamac replacement for TVM's <tvm/support/io.h>, written for the web runtime build.
// A binary stream with typed Read/Write helpers; the byte layout of every type is defined by
// tvm::support::Serializer in serializer.h (little-endian, sizes as uint64, like TVM's own files).
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace tvm {
namespace support {

template <typename T, typename Enable = void>
struct Serializer;

class Stream {
 public:
  virtual ~Stream() = default;
  // Raw byte transfer: Read returns the number of bytes actually read.
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* data, size_t count) {
    if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>) {
      if (count != 0) this->Write(static_cast<const void*>(data), sizeof(T) * count);
    } else {
      for (size_t i = 0; i < count; ++i) this->Write(data[i]);
    }
  }
  template <typename T>
  bool ReadArray(T* data, size_t count) {
    if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>) {
      if (count == 0) return true;
      return this->Read(static_cast<void*>(data), sizeof(T) * count) == sizeof(T) * count;
    } else {
      for (size_t i = 0; i < count; ++i) {
        if (!this->Read(data + i)) return false;
      }
      return true;
    }
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVM_SUPPORT_IO_H_
