// llamac replacement for TVM's src/support/ring_buffer.h: a growable FIFO byte queue used by the
// RPC endpoint to stage bytes between a channel and the protocol handler.
#ifndef TVM_SUPPORT_RING_BUFFER_H_
#define TVM_SUPPORT_RING_BUFFER_H_

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  RingBuffer() : ring_(kInitCapacity) {}

  size_t bytes_available() const { return size_; }
  size_t capacity() const { return ring_.size(); }

  // Ensures room for n bytes in total without reallocating later.
  void Reserve(size_t n) {
    if (n <= ring_.size()) return;
    size_t cap = ring_.size();
    while (cap < n) cap *= 2;
    std::vector<char> grown(cap);
    CopyOut(grown.data(), size_);
    ring_.swap(grown);
    head_ = 0;
  }

  // Pops size bytes (the caller checked bytes_available()).
  void Read(void* data, size_t size) {
    size = std::min(size, size_);
    CopyOut(static_cast<char*>(data), size);
    Drop(size);
  }

  void Write(const void* data, size_t size) {
    Reserve(size_ + size);
    const char* src = static_cast<const char*>(data);
    size_t tail = (head_ + size_) % ring_.size();
    size_t first = std::min(size, ring_.size() - tail);
    std::memcpy(ring_.data() + tail, src, first);
    std::memcpy(ring_.data(), src + first, size - first);
    size_ += size;
  }

  // Hands up to max_nbytes of queued bytes to frecv(const void*, size_t) -> bytes consumed.
  template <typename F>
  size_t ReadWithCallback(F frecv, size_t max_nbytes) {
    size_t n = std::min(max_nbytes, size_);
    n = std::min(n, ring_.size() - head_);  // contiguous part only
    if (n == 0) return 0;
    size_t used = frecv(ring_.data() + head_, n);
    Drop(used);
    return used;
  }

  // Lets fsend(void*, size_t) -> bytes produced fill up to max_nbytes of free space.
  template <typename F>
  size_t WriteWithCallback(F fsend, size_t max_nbytes) {
    Reserve(size_ + max_nbytes);
    size_t tail = (head_ + size_) % ring_.size();
    // free space starting at tail is contiguous up to head_ (wrapped) or to the end of ring_
    size_t n = tail < head_ || size_ == ring_.size() ? head_ - tail : ring_.size() - tail;
    n = std::min(n, max_nbytes);
    size_t got = fsend(ring_.data() + tail, n);
    size_ += got;
    return got;
  }

 private:
  static constexpr size_t kInitCapacity = 1024;

  void CopyOut(char* dst, size_t n) const {
    size_t first = std::min(n, ring_.size() - head_);
    std::memcpy(dst, ring_.data() + head_, first);
    std::memcpy(dst + first, ring_.data(), n - first);
  }
  void Drop(size_t n) {
    head_ = (head_ + n) % ring_.size();
    size_ -= n;
    if (size_ == 0) head_ = 0;
  }

  std::vector<char> ring_;
  size_t head_ = 0;
  size_t size_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_RING_BUFFER_H_
