// llamac replacement for compiler-rt's builtin_fp16.h as TVM uses it: generic conversions between
// IEEE-754 binary formats, parameterized by value type, bit-pattern type and significand width.
// Narrowing rounds to nearest, ties to even; NaNs stay (quiet) NaNs.
#ifndef LLAMAC_BUILTIN_FP16_H_
#define LLAMAC_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace llamac_fp {
template <typename REP_T, int SIG_BITS>
struct Format {
  static constexpr int kBits = sizeof(REP_T) * 8;
  static constexpr int kExpBits = kBits - SIG_BITS - 1;
  static constexpr int kExpMax = (1 << kExpBits) - 1;
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr uint64_t kSigMask = (uint64_t(1) << SIG_BITS) - 1;
};

template <typename To, typename From>
inline To BitCast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// Rounds sig >> shift to nearest even.
inline uint64_t ShiftRound(uint64_t sig, int shift) {
  if (shift <= 0) return sig << -shift;
  if (shift >= 64) return 0;
  uint64_t kept = sig >> shift;
  uint64_t rem = sig & ((uint64_t(1) << shift) - 1);
  uint64_t half = uint64_t(1) << (shift - 1);
  if (rem > half || (rem == half && (kept & 1))) ++kept;
  return kept;
}
}  // namespace llamac_fp

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
inline DST_T __truncXfYf2__(SRC_T a) {
  using S = llamac_fp::Format<SRC_REP_T, SRC_SIG_BITS>;
  using D = llamac_fp::Format<DST_REP_T, DST_SIG_BITS>;
  uint64_t rep = llamac_fp::BitCast<SRC_REP_T>(a);
  uint64_t sign = (rep >> (S::kBits - 1)) & 1;
  int exp = static_cast<int>((rep >> SRC_SIG_BITS) & S::kExpMax);
  uint64_t sig = rep & S::kSigMask;
  uint64_t out;
  if (exp == S::kExpMax) {  // infinity or NaN
    out = uint64_t(D::kExpMax) << DST_SIG_BITS;
    if (sig != 0) out |= (uint64_t(1) << (DST_SIG_BITS - 1)) | (sig >> (SRC_SIG_BITS - DST_SIG_BITS));
  } else if (exp == 0) {  // zero or a source subnormal: far below the narrow format's range
    out = 0;
  } else {
    int new_exp = exp - S::kBias + D::kBias;
    if (new_exp >= D::kExpMax) {
      out = uint64_t(D::kExpMax) << DST_SIG_BITS;  // overflow to infinity
    } else if (new_exp >= 1) {
      // a carry out of the significand correctly bumps the exponent (up to infinity)
      out = (uint64_t(new_exp) << DST_SIG_BITS) +
            llamac_fp::ShiftRound(sig, SRC_SIG_BITS - DST_SIG_BITS);
    } else {  // result is subnormal (or rounds to zero / the smallest normal)
      uint64_t full = sig | (uint64_t(1) << SRC_SIG_BITS);
      out = llamac_fp::ShiftRound(full, SRC_SIG_BITS - DST_SIG_BITS + 1 - new_exp);
    }
  }
  out |= sign << (D::kBits - 1);
  return llamac_fp::BitCast<DST_T>(static_cast<DST_REP_T>(out));
}

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
inline DST_T __extendXfYf2__(SRC_T a) {
  using S = llamac_fp::Format<SRC_REP_T, SRC_SIG_BITS>;
  using D = llamac_fp::Format<DST_REP_T, DST_SIG_BITS>;
  uint64_t rep = llamac_fp::BitCast<SRC_REP_T>(a);
  uint64_t sign = (rep >> (S::kBits - 1)) & 1;
  int exp = static_cast<int>((rep >> SRC_SIG_BITS) & S::kExpMax);
  uint64_t sig = rep & S::kSigMask;
  constexpr int kShift = DST_SIG_BITS - SRC_SIG_BITS;
  uint64_t out;
  if (exp == S::kExpMax) {
    out = (uint64_t(D::kExpMax) << DST_SIG_BITS) | (sig << kShift);
  } else if (exp == 0) {
    if (sig == 0) {
      out = 0;
    } else {  // normalize a source subnormal
      int e = 1 - S::kBias;
      while ((sig & (uint64_t(1) << SRC_SIG_BITS)) == 0) {
        sig <<= 1;
        --e;
      }
      sig &= S::kSigMask;
      out = (uint64_t(e + D::kBias) << DST_SIG_BITS) | (sig << kShift);
    }
  } else {
    out = (uint64_t(exp - S::kBias + D::kBias) << DST_SIG_BITS) | (sig << kShift);
  }
  out |= sign << (D::kBits - 1);
  return llamac_fp::BitCast<DST_T>(static_cast<DST_REP_T>(out));
}

#endif  // LLAMAC_BUILTIN_FP16_H_
