// llamac replacement for TVM's src/support/base64.h: RFC 4648 base64 streams layered on another
// stream (used to embed tensors in JSON).
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/support/io.h>

#include <cctype>
#include <cstdint>
#include <string>

namespace tvm {
namespace support {

namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
inline int Decode(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

// Encodes bytes written to it; call Finish() once at the end to flush the last group.
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}

  using Stream::Read;
  using Stream::Write;

  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    const uint8_t* p = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[n_++] = p[i];
      if (n_ == 3) EmitGroup();
    }
    return size;
  }
  void Finish() {
    if (n_ != 0) EmitGroup();
    if (!buf_.empty()) {
      out_->Write(buf_.data(), buf_.size());
      buf_.clear();
    }
  }

 private:
  void EmitGroup() {
    const char* a = base64::Alphabet();
    uint32_t v = (uint32_t(group_[0]) << 16) | (n_ > 1 ? uint32_t(group_[1]) << 8 : 0) |
                 (n_ > 2 ? uint32_t(group_[2]) : 0);
    buf_.push_back(a[(v >> 18) & 63]);
    buf_.push_back(a[(v >> 12) & 63]);
    buf_.push_back(n_ > 1 ? a[(v >> 6) & 63] : '=');
    buf_.push_back(n_ > 2 ? a[v & 63] : '=');
    n_ = 0;
    if (buf_.size() >= 4096) {
      out_->Write(buf_.data(), buf_.size());
      buf_.clear();
    }
  }
  Stream* out_;
  uint8_t group_[3] = {0, 0, 0};
  int n_ = 0;
  std::string buf_;
};

// Decodes base64 text read from another stream; InitPosition() skips leading whitespace.
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}

  using Stream::Read;
  using Stream::Write;

  void InitPosition() {
    char c;
    while (in_->Read(&c, 1) == 1) {
      if (!std::isspace(static_cast<unsigned char>(c))) {
        pending_ = c;
        has_pending_ = true;
        return;
      }
    }
  }
  size_t Write(const void*, size_t) final { return 0; }
  size_t Read(void* ptr, size_t size) final {
    uint8_t* p = static_cast<uint8_t*>(ptr);
    size_t done = 0;
    while (done < size) {
      if (avail_ == 0 && !Refill()) break;
      p[done++] = decoded_[count_ - avail_];
      --avail_;
    }
    return done;
  }

 private:
  bool NextChar(char* c) {
    if (has_pending_) {
      *c = pending_;
      has_pending_ = false;
      return true;
    }
    return in_->Read(c, 1) == 1;
  }
  // Decodes the next 4-character group into decoded_.
  bool Refill() {
    int vals[4];
    int got = 0;
    char c;
    while (got < 4 && NextChar(&c)) {
      if (c == '=') {
        vals[got++] = -2;
      } else {
        int v = base64::Decode(c);
        if (v >= 0) vals[got++] = v;
        else if (!std::isspace(static_cast<unsigned char>(c))) return false;  // end of data
      }
    }
    if (got < 4 || vals[0] < 0 || vals[1] < 0) return false;
    uint32_t v = (uint32_t(vals[0]) << 18) | (uint32_t(vals[1]) << 12) |
                 (vals[2] >= 0 ? uint32_t(vals[2]) << 6 : 0) | (vals[3] >= 0 ? uint32_t(vals[3]) : 0);
    decoded_[0] = uint8_t(v >> 16);
    decoded_[1] = uint8_t(v >> 8);
    decoded_[2] = uint8_t(v);
    count_ = vals[2] < 0 ? 1 : (vals[3] < 0 ? 2 : 3);
    avail_ = count_;
    return true;
  }
  Stream* in_;
  char pending_ = 0;
  bool has_pending_ = false;
  uint8_t decoded_[3] = {0, 0, 0};
  int count_ = 0;
  int avail_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_
