// llamac replacement for TVM's <tvm/support/serializer.h>, written for the web runtime build.
// Layout (must match what the TVM compiler writes): plain-old-data values as their raw bytes,
// strings and sequences as a uint64 element count followed by the elements, maps as a count
// followed by key/value pairs.
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T>
struct IsStdPair : std::false_type {};
template <typename A, typename B>
struct IsStdPair<std::pair<A, B>> : std::true_type {};

// Raw types: copied byte for byte.
template <typename T>
inline constexpr bool kRawSerializable =
    std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> && !IsStdPair<T>::value;

template <typename T, typename Enable>
struct Serializer {
  static constexpr bool enabled = false;
};

template <typename T>
struct Serializer<T, std::enable_if_t<kRawSerializable<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) { strm->Write(&value, sizeof(T)); }
  static bool Read(Stream* strm, T* out) { return strm->Read(out, sizeof(T)) == sizeof(T); }
};

namespace detail {
template <typename Seq>
inline void WriteCount(Stream* strm, const Seq& seq) {
  uint64_t n = static_cast<uint64_t>(seq.size());
  strm->Write(&n, sizeof(n));
}
inline bool ReadCount(Stream* strm, uint64_t* n) { return strm->Read(n, sizeof(*n)) == sizeof(*n); }
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) {
    detail::WriteCount(strm, s);
    if (!s.empty()) strm->Write(s.data(), s.size());
  }
  static bool Read(Stream* strm, std::string* out) {
    uint64_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    out->resize(n);
    return n == 0 || strm->Read(&(*out)[0], n) == n;
  }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) {
    uint64_t n = s.size();
    strm->Write(&n, sizeof(n));
    if (n != 0) strm->Write(s.data(), n);
  }
  static bool Read(Stream* strm, ffi::String* out) {
    std::string tmp;
    if (!Serializer<std::string>::Read(strm, &tmp)) return false;
    *out = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::pair<A, B>& p) {
    Serializer<A>::Write(strm, p.first);
    Serializer<B>::Write(strm, p.second);
  }
  static bool Read(Stream* strm, std::pair<A, B>* out) {
    return Serializer<A>::Read(strm, &out->first) && Serializer<B>::Read(strm, &out->second);
  }
};

template <typename T, typename Alloc>
struct Serializer<std::vector<T, Alloc>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::vector<T, Alloc>& v) {
    detail::WriteCount(strm, v);
    if constexpr (kRawSerializable<T>) {
      if (!v.empty()) strm->Write(v.data(), sizeof(T) * v.size());
    } else {
      for (const T& item : v) Serializer<T>::Write(strm, item);
    }
  }
  static bool Read(Stream* strm, std::vector<T, Alloc>* out) {
    uint64_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    out->resize(n);
    if constexpr (kRawSerializable<T>) {
      return n == 0 || strm->Read(out->data(), sizeof(T) * n) == sizeof(T) * n;
    } else {
      for (uint64_t i = 0; i < n; ++i) {
        if (!Serializer<T>::Read(strm, &(*out)[i])) return false;
      }
      return true;
    }
  }
};

namespace detail {
template <typename MapT, typename K, typename V>
struct StdMapSerializer {
  static void Write(Stream* strm, const MapT& m) {
    WriteCount(strm, m);
    for (const auto& kv : m) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, MapT* out) {
    uint64_t n;
    if (!ReadCount(strm, &n)) return false;
    out->clear();
    for (uint64_t i = 0; i < n; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(strm, &key) || !Serializer<V>::Read(strm, &value)) return false;
      out->emplace(std::move(key), std::move(value));
    }
    return true;
  }
};
}  // namespace detail

template <typename K, typename V, typename H, typename E, typename A>
struct Serializer<std::unordered_map<K, V, H, E, A>>
    : detail::StdMapSerializer<std::unordered_map<K, V, H, E, A>, K, V> {
  static constexpr bool enabled = true;
};

template <typename K, typename V, typename C, typename A>
struct Serializer<std::map<K, V, C, A>> : detail::StdMapSerializer<std::map<K, V, C, A>, K, V> {
  static constexpr bool enabled = true;
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& arr) {
    detail::WriteCount(strm, arr);
    for (const T& item : arr) Serializer<T>::Write(strm, item);
  }
  static bool Read(Stream* strm, ffi::Array<T>* out) {
    uint64_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    ffi::Array<T> result;
    result.reserve(n);
    for (uint64_t i = 0; i < n; ++i) {
      T item;
      if (!Serializer<T>::Read(strm, &item)) return false;
      result.push_back(std::move(item));
    }
    *out = std::move(result);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Map<K, V>& m) {
    detail::WriteCount(strm, m);
    for (const auto& kv : m) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, ffi::Map<K, V>* out) {
    uint64_t n;
    if (!detail::ReadCount(strm, &n)) return false;
    ffi::Map<K, V> result;
    for (uint64_t i = 0; i < n; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(strm, &key) || !Serializer<V>::Read(strm, &value)) return false;
      result.Set(key, value);
    }
    *out = std::move(result);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
