// llamac replacement for TVM's src/support/arena.h: a bump allocator for short-lived trivially
// destructible objects; memory comes back all at once with RecycleAll().
#ifndef TVM_SUPPORT_ARENA_H_
#define TVM_SUPPORT_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { FreeAll(); }

  // Uninitialized storage for count objects of T.
  template <typename T>
  T* allocate_(int count = 1) {
    static_assert(std::is_trivially_destructible<T>::value, "arena objects are never destroyed");
    return static_cast<T*>(Alloc(sizeof(T) * static_cast<size_t>(count < 0 ? 0 : count), alignof(T)));
  }
  template <typename T, typename... Args>
  T* make(Args&&... args) {
    return new (allocate_<T>(1)) T(std::forward<Args>(args)...);
  }

  // Keeps the first block for reuse and frees the rest.
  void RecycleAll() {
    for (size_t i = 1; i < blocks_.size(); ++i) std::free(blocks_[i].data);
    if (blocks_.size() > 1) blocks_.resize(1);
    if (!blocks_.empty()) blocks_[0].used = 0;
  }

 private:
  struct Block {
    char* data;
    size_t size;
    size_t used;
  };
  static constexpr size_t kBlockSize = 16 * 1024;

  void* Alloc(size_t nbytes, size_t align) {
    if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
    if (!blocks_.empty()) {
      Block& b = blocks_.back();
      size_t start = (b.used + align - 1) / align * align;
      if (start + nbytes <= b.size) {
        b.used = start + nbytes;
        return b.data + start;
      }
    }
    size_t size = nbytes + align > kBlockSize ? nbytes + align : kBlockSize;
    char* data = static_cast<char*>(std::malloc(size));
    if (data == nullptr) throw std::bad_alloc();
    blocks_.push_back(Block{data, size, 0});
    Block& b = blocks_.back();
    size_t start = (reinterpret_cast<uintptr_t>(data) + align - 1) / align * align -
                   reinterpret_cast<uintptr_t>(data);
    b.used = start + nbytes;
    return b.data + start;
  }
  void FreeAll() {
    for (Block& b : blocks_) std::free(b.data);
    blocks_.clear();
  }

  std::vector<Block> blocks_;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ARENA_H_
