// Multi-resolution hash-grid encoding on the CPU: forward and backward, parallel with OpenMP.
//
// The semantics are those of kernels/hashgrid/reference.py (the specification); this file only
// makes them fast. It deliberately includes no torch headers: it exposes a small C ABI called
// through ctypes with raw pointers to contiguous tensors, so a cold build compiles only this
// file (~8 s on 2 cores) instead of the minutes a <torch/extension.h> unit needs.
//
// Layout: x (N, 3); table (L, S, F) with S = 2**T; out (N, L*F) level-major.
// Level l has R_l cells per axis; point x (clamped to [0,1]) sits at p = x * R in cell
// i = min(floor(p), R - 1) with local coordinate w = p - i. Corner rows: dense
// cx + cy (R+1) + cz (R+1)^2 when (R+1)^3 <= S, else (cx*P0 ^ cy*P1 ^ cz*P2) & (S - 1).
//
// Parallel structure (OpenMP, the thread count passed in from torch.get_num_threads()):
//   forward  : (level, point block) work items in level-major order, dynamic schedule: the
//              threads share one level's table in cache at a time; no write conflicts.
//   backward : table gradient by levels: a thread owns a level while it scatters into it, so
//              no atomics are needed when there are at least as many levels as threads; with
//              more threads than levels, levels are split into point chunks and the scatter uses
//              atomic adds. The input gradient is accumulated into per-thread (N, 3) buffers,
//              summed at the end.
//   Both sweep their points with the corner rows of a point a few places ahead prefetched: the
//   gathers and scatters into a hashed level's MBs of table are cache-miss bound.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

constexpr uint32_t kPrime1 = 2654435761u;
constexpr uint32_t kPrime2 = 805459861u;

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: man * 2^-24
      const float f = std::ldexp(static_cast<float>(man), -24);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float to_float(BFloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename A> inline A load(float v) { return static_cast<A>(v); }
template <typename A> inline A load(double v) { return static_cast<A>(v); }
template <typename A> inline A load(Half v) { return static_cast<A>(to_float(v)); }
template <typename A> inline A load(BFloat16 v) { return static_cast<A>(to_float(v)); }

struct Level {
  int64_t resolution;
  bool dense;
};

// Cell, local coordinates and corner rows of one point on one level.
template <typename P>
struct Cell {
  uint32_t row[8];
  P frac[3];
};

template <typename P>
inline P clamp01(P v) {
  // NaN stays NaN (both comparisons are false), as torch.clamp does.
  return v < P(0) ? P(0) : (v > P(1) ? P(1) : v);
}

template <typename P>
inline void locate(const P* xp, const Level& lv, uint32_t mask, Cell<P>& c) {
  const int64_t res = lv.resolution;
  uint32_t ci[3];
  for (int a = 0; a < 3; ++a) {
    const P p = clamp01(xp[a]) * static_cast<P>(res);
    const P fl = std::floor(p);
    // A NaN coordinate lands in cell 0 (the reference's clamp of the cast does the same) and
    // keeps a NaN local coordinate, so the output is NaN and memory accesses stay in bounds.
    const int64_t i = fl >= P(0) ? (fl <= static_cast<P>(res - 1) ? static_cast<int64_t>(fl) : res - 1) : 0;
    ci[a] = static_cast<uint32_t>(i);
    c.frac[a] = p - static_cast<P>(i);
  }
  if (lv.dense) {
    const uint32_t side = static_cast<uint32_t>(res + 1);
    const uint32_t base = ci[0] + ci[1] * side + ci[2] * side * side;
    const uint32_t dy = side, dz = side * side;
    for (int k = 0; k < 8; ++k) {
      c.row[k] = base + (k & 1) + ((k >> 1) & 1) * dy + ((k >> 2) & 1) * dz;
    }
  } else {
    const uint32_t hx[2] = {ci[0], ci[0] + 1u};
    const uint32_t hy[2] = {ci[1] * kPrime1, (ci[1] + 1u) * kPrime1};
    const uint32_t hz[2] = {ci[2] * kPrime2, (ci[2] + 1u) * kPrime2};
    for (int k = 0; k < 8; ++k) {
      c.row[k] = (hx[k & 1] ^ hy[(k >> 1) & 1] ^ hz[(k >> 2) & 1]) & mask;
    }
  }
}

// Trilinear weight of each corner, as the reference: (wx * wy) * wz.
template <typename P>
inline void weights(const P* f, P* w) {
  const P wx[2] = {P(1) - f[0], f[0]};
  const P wy[2] = {P(1) - f[1], f[1]};
  const P wz[2] = {P(1) - f[2], f[2]};
  for (int k = 0; k < 8; ++k) w[k] = (wx[k & 1] * wy[(k >> 1) & 1]) * wz[(k >> 2) & 1];
}

// A fresh multi-MB gradient buffer costs one page fault per 4 KB on first touch (at L=16,
// T=19, F=2: 16k faults, about as long as the scatter itself). Asking for transparent huge
// pages before touching it cuts that by 512x where the kernel allows them (a no-op elsewhere).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Problem {
  int64_t n;
  int n_levels;
  int64_t table_size;
  int n_features;
  std::vector<Level> levels;
  int n_threads;
};

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Points are visited in order with the corner rows of the point kLookahead ahead already
// computed and prefetched: the gathers are latency-bound (a hashed level's table is MBs), and
// this keeps several cache misses in flight.
constexpr int kLookahead = 8;  // a power of two

template <typename P, typename Prefetch, typename Visit>
inline void sweep(const P* x, int64_t begin, int64_t end, const Level& lv, uint32_t mask, Prefetch prefetch,
                  Visit visit) {
  Cell<P> ring[kLookahead];
  const int64_t head = std::min<int64_t>(end - begin, kLookahead);
  for (int64_t j = 0; j < head; ++j) {
    locate(x + 3 * (begin + j), lv, mask, ring[j]);
    prefetch(ring[j]);
  }
  for (int64_t i = begin; i < end; ++i) {
    Cell<P>& c = ring[(i - begin) & (kLookahead - 1)];
    visit(i, c);
    if (i + kLookahead < end) {
      locate(x + 3 * (i + kLookahead), lv, mask, c);
      prefetch(c);
    }
  }
}

// FC > 0: features known at compile time; FC == 0: runtime pr.n_features.
template <typename P, typename T, int FC>
void forward_impl(const Problem& pr, const P* x, const T* table, P* out) {
  const int F = FC > 0 ? FC : pr.n_features;
  const int64_t n = pr.n, L = pr.n_levels, S = pr.table_size;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const int64_t block = 4096;
  const int64_t n_blocks = (n + block - 1) / block;
  const int64_t items = n_blocks * L;
#pragma omp parallel for schedule(dynamic, 1) num_threads(pr.n_threads)
  for (int64_t item = 0; item < items; ++item) {
    // Level-major: the threads sweep one level's table at a time, keeping it hot in cache.
    const int64_t l = item / n_blocks, b = item % n_blocks;
    const T* tab = table + l * S * F;
    const auto prefetch = [&](const Cell<P>& c) {
      for (int k = 0; k < 8; ++k) __builtin_prefetch(tab + static_cast<int64_t>(c.row[k]) * F, 0, 1);
    };
    const auto visit = [&](int64_t i, const Cell<P>& c) {
      P w[8];
      weights(c.frac, w);
      P* o = out + i * L * F + l * F;
      for (int f = 0; f < F; ++f) {
        P s = P(0);
        for (int k = 0; k < 8; ++k) s += w[k] * load<P>(tab[static_cast<int64_t>(c.row[k]) * F + f]);
        o[f] = s;
      }
    };
    sweep(x, b * block, std::min(n, (b + 1) * block), pr.levels[l], mask, prefetch, visit);
  }
}

template <typename G, typename V>
inline void add(G* dst, V v, bool atomic) {
  if (atomic) {
#pragma omp atomic
    *dst += static_cast<G>(v);
  } else {
    *dst += static_cast<G>(v);
  }
}

// grad_table: (L, S, F) in G (uninitialised: zeroed here) or null; grad_x: (N, 3) in P or null.
template <typename P, typename T, typename G, int FC>
void backward_impl(const Problem& pr, const P* x, const T* table, const P* grad_out, G* grad_table, P* grad_x) {
  const int F = FC > 0 ? FC : pr.n_features;
  const int64_t n = pr.n, L = pr.n_levels, S = pr.table_size;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const int nt = pr.n_threads;
  // Split each level into chunks only when there are more threads than levels.
  const int64_t chunks = std::max<int64_t>(1, (nt + L - 1) / L);
  const bool atomic = chunks > 1 && grad_table != nullptr;
  const int64_t chunk = (n + chunks - 1) / chunks;
  const int64_t items = L * chunks;
  const int64_t slab = S * F;  // one level of the table
  if (grad_table != nullptr) advise_huge_pages(grad_table, static_cast<size_t>(L * slab) * sizeof(G));
  if (grad_table != nullptr && chunks > 1) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t l = 0; l < L; ++l) std::fill(grad_table + l * slab, grad_table + (l + 1) * slab, G(0));
  }
  // Per-thread input-gradient partial sums, added up at the end.
  std::vector<P> dx_partial;
  if (grad_x != nullptr) dx_partial.assign(static_cast<size_t>(nt) * n * 3, P(0));

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t item = 0; item < items; ++item) {
    // Level-major: a thread owns one level's gradient slab while it scatters into it.
    const int64_t l = item / chunks, part = item % chunks;
    const T* tab = table + l * slab;
    G* gtab = grad_table != nullptr ? grad_table + l * slab : nullptr;
    // Zeroing the slab here (not in the caller) spreads the page faults of a fresh buffer over
    // the threads and leaves the slab in cache for the scatter.
    if (gtab != nullptr && chunks == 1) std::fill(gtab, gtab + slab, G(0));
    P* dxp = grad_x != nullptr ? dx_partial.data() + static_cast<size_t>(thread_id()) * n * 3 : nullptr;
    const P res = static_cast<P>(pr.levels[l].resolution);
    // Unconditional prefetches (GCC drops a prefetch that is the only statement of an if):
    // stream a is the gradient slab (else the table), stream b the table when x needs it.
    const char* pa = gtab != nullptr ? reinterpret_cast<const char*>(gtab) : reinterpret_cast<const char*>(tab);
    const int64_t sa = gtab != nullptr ? F * int64_t(sizeof(G)) : F * int64_t(sizeof(T));
    const char* pb = dxp != nullptr ? reinterpret_cast<const char*>(tab) : pa;
    const int64_t sb = dxp != nullptr ? F * int64_t(sizeof(T)) : sa;
    const auto prefetch = [&](const Cell<P>& c) {
      for (int k = 0; k < 8; ++k) {
        __builtin_prefetch(pa + static_cast<int64_t>(c.row[k]) * sa, 1, 1);
        __builtin_prefetch(pb + static_cast<int64_t>(c.row[k]) * sb, 0, 1);
      }
    };
    const auto visit = [&](int64_t i, const Cell<P>& c) {
      const P* g = grad_out + i * L * F + l * F;
      const P fx = c.frac[0], fy = c.frac[1], fz = c.frac[2];
      const P wx[2] = {P(1) - fx, fx}, wy[2] = {P(1) - fy, fy}, wz[2] = {P(1) - fz, fz};
      if (gtab != nullptr) {
        for (int k = 0; k < 8; ++k) {
          const P w = (wx[k & 1] * wy[(k >> 1) & 1]) * wz[(k >> 2) & 1];
          G* row = gtab + static_cast<int64_t>(c.row[k]) * F;
          for (int f = 0; f < F; ++f) add(row + f, w * g[f], atomic);
        }
      }
      if (dxp != nullptr) {
        // s_k = sum_f g_f * feature_kf; d out / d frac_a = sum over the 4 edges along axis a
        // of (s_upper - s_lower) times the other two axes' weights.
        P s[8];
        for (int k = 0; k < 8; ++k) {
          const T* row = tab + static_cast<int64_t>(c.row[k]) * F;
          P acc = P(0);
          for (int f = 0; f < F; ++f) acc += g[f] * load<P>(row[f]);
          s[k] = acc;
        }
        const P d0 = wy[0] * wz[0] * (s[1] - s[0]) + wy[1] * wz[0] * (s[3] - s[2]) +
                     wy[0] * wz[1] * (s[5] - s[4]) + wy[1] * wz[1] * (s[7] - s[6]);
        const P d1 = wx[0] * wz[0] * (s[2] - s[0]) + wx[1] * wz[0] * (s[3] - s[1]) +
                     wx[0] * wz[1] * (s[6] - s[4]) + wx[1] * wz[1] * (s[7] - s[5]);
        const P d2 = wx[0] * wy[0] * (s[4] - s[0]) + wx[1] * wy[0] * (s[5] - s[1]) +
                     wx[0] * wy[1] * (s[6] - s[2]) + wx[1] * wy[1] * (s[7] - s[3]);
        P* d = dxp + 3 * i;
        d[0] += d0 * res;
        d[1] += d1 * res;
        d[2] += d2 * res;
      }
    };
    sweep(x, part * chunk, std::min(n, (part + 1) * chunk), pr.levels[l], mask, prefetch, visit);
  }

  if (grad_x != nullptr) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < n; ++i) {
      for (int a = 0; a < 3; ++a) {
        P s = P(0);
        for (int t = 0; t < nt; ++t) s += dx_partial[static_cast<size_t>(t) * n * 3 + 3 * i + a];
        const P xv = x[3 * i + a];
        // torch.clamp passes the gradient where min <= x <= max (boundaries included).
        grad_x[3 * i + a] = (xv >= P(0) && xv <= P(1)) ? s : P(0);
      }
    }
  }
}

// Compile-time feature counts (F = 2, 4) for float32 positions with a 32- or 16-bit table;
// everything else (float64, other F) uses the runtime-F loop. Fewer instantiations keep the
// first-use build short.
template <typename P, typename T>
constexpr bool kSpecialise = std::is_same_v<P, float> && !std::is_same_v<T, double>;

template <typename P, typename T, typename G>
void backward_dispatch_f(const Problem& pr, const P* x, const T* t, const P* go, G* gt, P* gx) {
  if constexpr (kSpecialise<P, T>) {
    if (pr.n_features == 2) return backward_impl<P, T, G, 2>(pr, x, t, go, gt, gx);
    if (pr.n_features == 4) return backward_impl<P, T, G, 4>(pr, x, t, go, gt, gx);
  }
  backward_impl<P, T, G, 0>(pr, x, t, go, gt, gx);
}

template <typename P, typename T>
void forward_dispatch_f(const Problem& pr, const P* x, const T* t, P* out) {
  if constexpr (kSpecialise<P, T>) {
    if (pr.n_features == 2) return forward_impl<P, T, 2>(pr, x, t, out);
    if (pr.n_features == 4) return forward_impl<P, T, 4>(pr, x, t, out);
  }
  forward_impl<P, T, 0>(pr, x, t, out);
}

// Returns 0, or a negative code for an unsupported argument.
int make_problem(int64_t n, int n_levels, int log2_table_size, int n_features, const int64_t* resolutions,
                 const uint8_t* dense, int n_threads, Problem& pr) {
  if (n < 0 || n_levels < 1 || n_features < 1 || log2_table_size < 1 || log2_table_size > 31) return -2;
  pr.n = n;
  pr.n_levels = n_levels;
  pr.table_size = int64_t(1) << log2_table_size;
  pr.n_features = n_features;
  pr.n_threads = n_threads < 1 ? 1 : n_threads;
  pr.levels.resize(n_levels);
  for (int l = 0; l < n_levels; ++l) {
    if (resolutions[l] < 1) return -3;
    pr.levels[l] = Level{resolutions[l], dense[l] != 0};
    // A dense level must fit: its largest row (R+1)^3 - 1 < S.
    if (pr.levels[l].dense) {
      const int64_t side = resolutions[l] + 1;
      if (side * side * side > pr.table_size) return -4;
    }
  }
  return 0;
}

template <typename P>
int forward_table(int table_dtype, const Problem& pr, const P* x, const void* table, P* out) {
  switch (table_dtype) {
    case kFloat32: forward_dispatch_f(pr, x, static_cast<const float*>(table), out); return 0;
    case kFloat64: forward_dispatch_f(pr, x, static_cast<const double*>(table), out); return 0;
    case kFloat16: forward_dispatch_f(pr, x, static_cast<const Half*>(table), out); return 0;
    case kBFloat16: forward_dispatch_f(pr, x, static_cast<const BFloat16*>(table), out); return 0;
    default: return -1;
  }
}

// The table gradient buffer is float64 for a float64 table, else float32.
template <typename P>
int backward_table(int table_dtype, const Problem& pr, const P* x, const void* table, const P* go, void* gt,
                   P* gx) {
  switch (table_dtype) {
    case kFloat32:
      backward_dispatch_f(pr, x, static_cast<const float*>(table), go, static_cast<float*>(gt), gx);
      return 0;
    case kFloat64:
      backward_dispatch_f(pr, x, static_cast<const double*>(table), go, static_cast<double*>(gt), gx);
      return 0;
    case kFloat16:
      backward_dispatch_f(pr, x, static_cast<const Half*>(table), go, static_cast<float*>(gt), gx);
      return 0;
    case kBFloat16:
      backward_dispatch_f(pr, x, static_cast<const BFloat16*>(table), go, static_cast<float*>(gt), gx);
      return 0;
    default:
      return -1;
  }
}

}  // namespace

extern "C" {

// Bumped when the C ABI changes; checked from Python after loading.
int hg_abi_version() { return 1; }

int hg_forward(int pos_dtype, int table_dtype, const void* x, int64_t n, const void* table, int n_levels,
               int log2_table_size, int n_features, const int64_t* resolutions, const uint8_t* dense, void* out,
               int n_threads) {
  Problem pr;
  if (const int err = make_problem(n, n_levels, log2_table_size, n_features, resolutions, dense, n_threads, pr)) {
    return err;
  }
  if (pos_dtype == kFloat32) {
    return forward_table(table_dtype, pr, static_cast<const float*>(x), table, static_cast<float*>(out));
  }
  if (pos_dtype == kFloat64) {
    return forward_table(table_dtype, pr, static_cast<const double*>(x), table, static_cast<double*>(out));
  }
  return -1;
}

// grad_table (zeroed, float32 or float64 as above) and grad_x may each be null to skip them.
int hg_backward(int pos_dtype, int table_dtype, const void* x, int64_t n, const void* table, int n_levels,
                int log2_table_size, int n_features, const int64_t* resolutions, const uint8_t* dense,
                const void* grad_out, void* grad_table, void* grad_x, int n_threads) {
  Problem pr;
  if (const int err = make_problem(n, n_levels, log2_table_size, n_features, resolutions, dense, n_threads, pr)) {
    return err;
  }
  if (pos_dtype == kFloat32) {
    return backward_table(table_dtype, pr, static_cast<const float*>(x), table, static_cast<const float*>(grad_out),
                          grad_table, static_cast<float*>(grad_x));
  }
  if (pos_dtype == kFloat64) {
    return backward_table(table_dtype, pr, static_cast<const double*>(x), table,
                          static_cast<const double*>(grad_out), grad_table, static_cast<double*>(grad_x));
  }
  return -1;
}

}  // extern "C"
