// Kernels for XLA:CPU, called through the XLA FFI (see pemn_jax/native/__init__.py).
//
// Activations (x, y, dy, dx below) are float32 or bfloat16, all of one call alike: bfloat16 is
// widened to float32 on load and rounded to nearest even on store, so the arithmetic is the
// float32 call's on the same values (kernels, coefficients and statistics are float32).
//
// Depthwise 2-D convolution: two handlers, NHWC activations, (KH, KW, C) float32 kernels:
//
//   pemn_dw_fwd:   y[n, oh, ow, c] = sum_ij x[n, oh + i - pad_h, ow + j - pad_w, c] * k[i, j, c]
//                  (x read as zero outside its bounds; the output size is the result's shape, so
//                  negative pads crop). The input gradient of a stride-1 depthwise conv is the same
//                  call on the cotangent with the flipped kernel.
//   pemn_dw_kgrad: dk[g, i, j, c] = sum over the images n of group g, and over (oh, ow), of
//                  x[n, oh + i - pad_h, ow + j - pad_w, c] * dy[n, oh, ow, c]: the kernel
//                  gradient, as G partial sums over equal consecutive groups of the batch.
//
// XLA lowers both to per-tap reductions over the whole batch that stream memory several times;
// here every input is read once. Both work on channel blocks (VL channels each) that share a
// 64-byte cache line (one block of float32, two of bfloat16), each block in turn zero-padded into
// a small local buffer that stays in L1. The forward's work item is an image's blocks (all of
// them unless the batch is small), its KH*KW taps held in registers and kQ outputs'
// accumulators kept in flight; the kernel gradient's item is a line of blocks over a group of
// images, its KH*KW sums held in registers while kKgradQ outputs' cotangents at a time meet the
// padded pixels they touch.
// Work items are spread over XLA's intra-op thread pool.
//
// GELU -> BatchNorm in training (ConvMixer's "GELU, BN" after every conv), on x viewed as rows
// of C channels, in four streaming passes (z = gelu(x), exact erf form):
//   pemn_gelu_stats:   [sum z, sum z^2] per channel                         -> f32[2, C]
//   pemn_gelu_bn_fwd:  y = z * coef[0] + coef[1]  (coef: scale*rstd, bias - mean*scale*rstd)
//                      (pemn_gelu_bn_add_fwd: the same plus a residual r, one rounding)
//   pemn_gelu_bn_bstats: [sum dy, sum dy * (z - mean) * rstd] (coef: mean, rstd) -> f32[2, C]
//   pemn_gelu_bn_bwd:  dx = (coef[0] * dy + coef[1] + coef[2] * z) * gelu'(x)
// XLA computes the same with ~10 fusions and several full-size residuals per site; here only x
// is kept, and z and gelu'(x) are recomputed in each pass (vectorised exp, erfc).
// The GELU is the passes' cost (compute-bound: ~4x a streaming pass of the same bytes), so the
// same four passes also come in a form that evaluates it once, for twice the residuals:
//   pemn_gelu_stats_save: the stats, and z and d = gelu'(x) stored in x's dtype (the stats are
//                         those of the stored z)
//   pemn_bn_fwd / pemn_bn_add_fwd / pemn_bn_bstats: the forward passes and the backward's stats
//                         on the stored z
//   pemn_bn_bwd_saved:    dx = (coef[0] * dy + coef[1] + coef[2] * z) * d
// and pemn_add: y = a + b, one rounding (a residual block input's two cotangents; XLA's own
// fusion of this bfloat16 add ran ~2.5x as long in the training step).
//
// Top-k mask: pemn_topk_mask: mask[i] = 1 for the `kept` largest entries of x (any shape, taken
// flat), 0 elsewhere; the order and tie rule are those of XLA's TopK (a total order on floats,
// so -0 < +0 and NaN sorts above +inf; equal values kept in index order). XLA's TopK sorts the
// kept half of a layer's scores; std::nth_element only partitions, in linear time.
//
// bfloat16 GEMM: pemn_gemm_bf16: c = op(a) @ op(b) in float32 from bfloat16 a and b (op: the
// matrix or its transpose, attributes trans_a, trans_b; row-major), by the library function that
// PemnSetGemmBf16 hands over (MKL's cblas_gemm_bf16bf16f32, single-threaded, the output's rows
// split over XLA's pool here; or oneDNN's dnnl_gemm_bf16bf16f32), loaded by Python at run time
// where installed (AMX / AVX512-BF16). Without one the call fails (Python never uses it then).
//
// bfloat16 product on AMX tiles: pemn_matmul_amx: c = a @ op(b) in bfloat16 (float32 sums of
// the exact products, rounded once), the tile loop written here, so that each 32-row block of c
// is rounded from L1 and no float32 product is written to memory. Built only where the compiler
// targets AMX-BF16 (-march=native on such a CPU); PemnAmxReady says whether it can run.
#include <algorithm>
#include <immintrin.h>
#include <initializer_list>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
// Naturally aligned; Load and Store go through memcpy, so the activations need no alignment.
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline vf Load(const float* p, int lanes) {
  vf v = {};
  if (lanes == VL) {
    std::memcpy(&v, p, sizeof(vf));
  } else {
    std::memcpy(&v, p, lanes * sizeof(float));
  }
  return v;
}

inline void Store(float* p, vf v, int lanes) {
  if (lanes == VL) {
    std::memcpy(p, &v, sizeof(vf));
  } else {
    std::memcpy(p, &v, lanes * sizeof(float));
  }
}

// bfloat16 (stored as uint16_t): widened exactly to float on load; rounded to nearest even on
// store (NaN stays a quiet NaN), as XLA's convert does.
typedef uint16_t vh __attribute__((vector_size(VL * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

inline vf Load(const uint16_t* p, int lanes) {
  vh h = {};
  if (lanes == VL) {  // a fixed-size copy: one vector load (a variable size calls memcpy)
    std::memcpy(&h, p, sizeof(vh));
  } else {
    std::memcpy(&h, p, lanes * sizeof(uint16_t));
  }
  vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void Store(uint16_t* p, vf v, int lanes) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  // One instruction where the CPU has it: it rounds to nearest even and quiets NaNs as below,
  // but flushes denormals to zero, so vectors with a denormal lane take the general path (XLA
  // runs its threads with denormals flushed, so none reach here from XLA's own arithmetic; both
  // paths agree on all 2^32 float32 bit patterns, bench_step_probes.md `st.cc`).
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  if (lanes == VL && !_mm512_fpclass_ps_mask(f, 0x20)) {  // 0x20: denormal
    const __m256bh h = _mm512_cvtneps_pbh(f);
    std::memcpy(p, &h, sizeof(h));
    return;
  }
#endif
  vu bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vu nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  vu r = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
  r = nan ? ((bits >> 16) | 0x40u) : r;
  vh h = __builtin_convertvector(r, vh);
  if (lanes == VL) {
    std::memcpy(p, &h, sizeof(vh));
  } else {
    std::memcpy(p, &h, lanes * sizeof(uint16_t));
  }
}

// Runs f(0) ... f(n - 1) on the calling thread and on up to pool.num_threads() pool tasks. The
// caller never waits for a task that has not started: it takes items itself until none are
// left, then waits only for items already taken, so a busy or missing pool cannot deadlock.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* fp = &f;
  auto work = [state, fp, n]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fp)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t oh, ow;         // output (fwd) or cotangent (kgrad) spatial size
  int64_t kh, kw;         // taps
  int64_t pad_h, pad_w;   // leading pads (negative: crop)
  int64_t ph() const { return oh + kh - 1; }  // rows of the padded block
  int64_t pw() const { return ow + kw - 1; }
};

// Channel blocks of VL channels that one forward work item takes: as many as fill a 64-byte
// cache line of T (one block of float32, two of bfloat16), so that no two items, which may run on
// two threads at once, read or write parts of the same line.
template <typename T>
constexpr int64_t kLineBlocks = std::max<int64_t>(1, 64 / (VL * sizeof(T)));

// Copies channels [c0, c0 + lanes) of image `img` into `buf` as a zero-padded (ph, pw) block.
template <typename T>
void PadBlock(const Geometry& g, const T* x, int64_t img, int64_t c0, int lanes,
              std::vector<vf>& buf) {
  const int64_t ph = g.ph(), pw = g.pw();
  buf.assign(ph * pw, vf{});
  for (int64_t r = 0; r < ph; ++r) {
    const int64_t src_r = r - g.pad_h;
    if (src_r < 0 || src_r >= g.h) continue;
    const int64_t s0 = std::max<int64_t>(0, g.pad_w), s1 = std::min<int64_t>(pw, g.w + g.pad_w);
    const T* row = x + ((img * g.h + src_r) * g.w) * g.c + c0;
    for (int64_t s = s0; s < s1; ++s) buf[r * pw + s] = Load(row + (s - g.pad_w) * g.c, lanes);
  }
}

constexpr int kQ = 8;  // outputs of a row computed together by FwdItem

// Channel blocks [cb0, cb1) of image `img` (whole cache lines of them: see DwFwd).
// KH, KW > 0: compile-time taps (fully unrolled, accumulators in registers); 0: runtime.
template <int KH, int KW, typename T>
void FwdItem(const Geometry& g, const T* x, const float* k, T* y, int64_t img, int64_t cb0,
             int64_t cb1) {
  const int64_t kh = KH ? KH : g.kh, kw = KW ? KW : g.kw;
  thread_local std::vector<vf> buf;
  std::vector<vf> taps_rt;
  vf taps_ct[(KH ? KH : 1) * (KW ? KW : 1)];
  vf* taps = taps_ct;
  if (!KH || !KW) {
    taps_rt.resize(kh * kw);
    taps = taps_rt.data();
  }
  const int64_t pw = g.pw();
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    // The block's pixels share their cache lines with the item's other blocks: after the
    // first block's copy, the others are read from L1.
    const int64_t c0 = cb * VL;
    const int lanes = static_cast<int>(std::min<int64_t>(VL, g.c - c0));
    PadBlock(g, x, img, c0, lanes, buf);
    for (int64_t t = 0; t < kh * kw; ++t) taps[t] = Load(k + t * g.c + c0, lanes);
    for (int64_t r = 0; r < g.oh; ++r) {
      T* out = y + ((img * g.oh + r) * g.ow) * g.c + c0;
      // kQ outputs at once: kQ independent accumulator chains in flight (each output still sums
      // its taps in the same order as the one-at-a-time tail below).
      int64_t s = 0;
      for (; s + kQ <= g.ow; s += kQ) {
        vf acc[kQ] = {};
        for (int64_t i = 0; i < kh; ++i) {
          const vf* src = &buf[(r + i) * pw + s];
          for (int64_t j = 0; j < kw; ++j) {
            const vf tap = taps[i * kw + j];
            for (int q = 0; q < kQ; ++q) acc[q] += src[q + j] * tap;
          }
        }
        for (int q = 0; q < kQ; ++q) Store(out + (s + q) * g.c, acc[q], lanes);
      }
      for (; s < g.ow; ++s) {
        vf acc = {};
        for (int64_t i = 0; i < kh; ++i) {
          const vf* src = &buf[(r + i) * pw + s];
          for (int64_t j = 0; j < kw; ++j) acc += src[j] * taps[i * kw + j];
        }
        Store(out + s * g.c, acc, lanes);
      }
    }
  }
}

constexpr int kKgradQ = 4;  // outputs of a row whose products KgradItem takes together

// The kernel gradient's partial sum over the images of `group`, for channel blocks [cb0, cb1):
// each block of each image is zero-padded into a small local buffer (as the forward does), and
// its KH*KW sums kept in registers while the image's rows stream past. kKgradQ outputs at a
// time: each padded pixel is loaded once per kernel row and meets the cotangents of the outputs
// it touches, so the loads are ~(kKgradQ + KW - 1) / (kKgradQ * KW) of the FMAs. Every sum
// takes its terms in the order (image, row, column), as a one-output-at-a-time loop would.
template <int KH, int KW, typename T>
void KgradItem(const Geometry& g, const T* x, const T* dy, float* dk, int64_t group,
               int64_t groups, int64_t cb0, int64_t cb1) {
  const int64_t kh = KH ? KH : g.kh, kw = KW ? KW : g.kw, taps = kh * kw;
  const int64_t per = g.n / groups, pw = g.pw();
  thread_local std::vector<vf> buf;
  std::vector<vf> saved((cb1 - cb0) * taps, vf{});
  vf acc_ct[(KH ? KH : 1) * (KW ? KW : 1)];
  std::vector<vf> acc_rt;
  vf* acc = acc_ct;
  if (!KH || !KW) {
    acc_rt.resize(taps);
    acc = acc_rt.data();
  }
  for (int64_t img = group * per; img < (group + 1) * per; ++img) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c0 = cb * VL;
      const int lanes = static_cast<int>(std::min<int64_t>(VL, g.c - c0));
      PadBlock(g, x, img, c0, lanes, buf);
      vf* keep = saved.data() + (cb - cb0) * taps;
      for (int64_t t = 0; t < taps; ++t) acc[t] = keep[t];
      for (int64_t r = 0; r < g.oh; ++r) {
        const T* grow = dy + ((img * g.oh + r) * g.ow) * g.c + c0;
        int64_t s = 0;
        for (; s + kKgradQ <= g.ow; s += kKgradQ) {
          vf gv[kKgradQ];
          for (int q = 0; q < kKgradQ; ++q) gv[q] = Load(grow + (s + q) * g.c, lanes);
          for (int64_t i = 0; i < kh; ++i) {
            const vf* src = &buf[(r + i) * pw + s];
            vf* a = acc + i * kw;
            // Pixel p of the row meets output q at tap j = p - q; for a fixed tap, q rises
            // with p, so each sum takes its kKgradQ terms in column order.
            for (int64_t p = 0; p < kKgradQ + kw - 1; ++p) {
              const vf v = src[p];
              for (int q = 0; q < kKgradQ; ++q) {
                const int64_t j = p - q;
                if (j >= 0 && j < kw) a[j] += v * gv[q];
              }
            }
          }
        }
        for (; s < g.ow; ++s) {
          const vf gv = Load(grow + s * g.c, lanes);
          for (int64_t i = 0; i < kh; ++i) {
            const vf* src = &buf[(r + i) * pw + s];
            for (int64_t j = 0; j < kw; ++j) acc[i * kw + j] += src[j] * gv;
          }
        }
      }
      for (int64_t t = 0; t < taps; ++t) keep[t] = acc[t];
    }
  }
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const int64_t c0 = cb * VL;
    const int lanes = static_cast<int>(std::min<int64_t>(VL, g.c - c0));
    float* out = dk + group * taps * g.c + c0;
    for (int64_t t = 0; t < taps; ++t) Store(out + t * g.c, saved[(cb - cb0) * taps + t], lanes);
  }
}

template <typename Fn>
void Dispatch(int64_t kh, int64_t kw, Fn&& fn) {
  if (kh == 3 && kw == 3) return fn.template operator()<3, 3>();
  if (kh == 5 && kw == 5) return fn.template operator()<5, 5>();
  if (kh == 7 && kw == 7) return fn.template operator()<7, 7>();
  if (kh == 9 && kw == 9) return fn.template operator()<9, 9>();
  return fn.template operator()<0, 0>();
}

ffi::Error CheckRank(const char* what, size_t got, size_t want) {
  if (got != want) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string(what) + " must have rank " + std::to_string(want));
  }
  return ffi::Error::Success();
}

// The activation arrays of a handler are all float32 or all bfloat16 (kernels, coefficients and
// statistics stay float32): calls fn(T{}) with T float or uint16_t, or fails.
template <typename Fn>
ffi::Error ByType(std::initializer_list<ffi::DataType> types, Fn&& fn) {
  const ffi::DataType t = *types.begin();
  for (ffi::DataType u : types) {
    if (u != t) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "activations must share one dtype");
    }
  }
  if (t == ffi::DataType::F32) return fn(float{});
  if (t == ffi::DataType::BF16) return fn(uint16_t{});
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "activations must be float32 or bfloat16");
}

template <typename T>
const T* In(const ffi::AnyBuffer& b) {
  return static_cast<const T*>(b.untyped_data());
}

template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

ffi::Error DwFwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> k,
                 ffi::Result<ffi::AnyBuffer> y, int64_t pad_h, int64_t pad_w) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank("x", xd.size(), 4); e.failure()) return e;
  if (auto e = CheckRank("kernel", kd.size(), 3); e.failure()) return e;
  if (auto e = CheckRank("y", yd.size(), 4); e.failure()) return e;
  if (kd[2] != xd[3] || yd[3] != xd[3] || yd[0] != xd[0]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "channel or batch sizes disagree");
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], pad_h, pad_w};
  const int64_t blocks = (g.c + VL - 1) / VL;
  const float* kp = k.typed_data();
  return ByType({x.element_type(), y->element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    T* yp = Out<T>(y);
    Dispatch(g.kh, g.kw, [&]<int KH, int KW>() {
      // An item is an image's channel blocks, all of them where the batch gives every thread
      // several items: the blocks after the first then find the pixels' cache lines in L2 (the
      // first block's pass brought them in), which a one-line item leaves to the next item,
      // maybe on the other thread. Small batches split each image into fewer lines per item.
      const int64_t lines = (blocks + kLineBlocks<T> - 1) / kLineBlocks<T>;
      const int64_t want = 4 * (pool.num_threads() + 1);
      const int64_t splits = std::clamp<int64_t>((want + g.n - 1) / g.n, 1, lines);
      const int64_t per = (lines + splits - 1) / splits * kLineBlocks<T>;
      const int64_t groups = (blocks + per - 1) / per;
      ParallelFor(pool, g.n * groups, [&](int64_t item) {
        const int64_t cb0 = (item % groups) * per;
        FwdItem<KH, KW>(g, xp, kp, yp, item / groups, cb0, std::min(blocks, cb0 + per));
      });
    });
    return ffi::Error::Success();
  });
}

ffi::Error DwKgrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                   ffi::ResultBuffer<ffi::F32> dk, int64_t pad_h, int64_t pad_w) {
  auto xd = x.dimensions(), gd = dy.dimensions(), kd = dk->dimensions();
  if (auto e = CheckRank("x", xd.size(), 4); e.failure()) return e;
  if (auto e = CheckRank("dy", gd.size(), 4); e.failure()) return e;
  if (auto e = CheckRank("dk", kd.size(), 4); e.failure()) return e;
  if (gd[0] != xd[0] || gd[3] != xd[3] || kd[3] != xd[3] || kd[0] <= 0 || xd[0] % kd[0] != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "batch, group or channel sizes disagree");
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], kd[1], kd[2], pad_h, pad_w};
  const int64_t groups = kd[0], blocks = (g.c + VL - 1) / VL;
  float* kp = dk->typed_data();
  return ByType({x.element_type(), dy.element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    const T* gp = In<T>(dy);
    Dispatch(g.kh, g.kw, [&]<int KH, int KW>() {
      // Items: a batch group's channel blocks that share a cache line (as in the forward).
      const int64_t per = kLineBlocks<T>, lines = (blocks + per - 1) / per;
      ParallelFor(pool, groups * lines, [&](int64_t item) {
        const int64_t cb0 = (item % lines) * per;
        KgradItem<KH, KW>(g, xp, gp, kp, item / lines, groups, cb0, std::min(blocks, cb0 + per));
      });
    });
    return ffi::Error::Success();
  });
}

// ---- GELU -> BatchNorm --------------------------------------------------------------------

typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

inline vf Splat(float v) { return vf{} + v; }

// exp(x) for x <= 0 (Cephes' expf polynomial; relative error ~1e-7), flushing below -87 to 0.
inline vf VExpNeg(vf x) {
  const vf lo = Splat(-87.0f);
  const vi under = x < lo;
  x = under ? lo : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
#if defined(__AVX512F__)
  // floor and the scaling by 2^fl in one instruction each (the same values as below).
  __m512 fxr, flr;
  std::memcpy(&fxr, &fx, sizeof(fxr));
  flr = _mm512_roundscale_ps(fxr, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  vf fl;
  std::memcpy(&fl, &flr, sizeof(fl));
#else
  vf fl = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  fl = fl - __builtin_convertvector((fl > fx) & 1, vf);  // floor
#endif
  vf r = x - fl * 0.693359375f + fl * 2.12194440e-4f;
  vf p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  __m512 pr;
  std::memcpy(&pr, &p, sizeof(pr));
  pr = _mm512_scalef_ps(pr, flr);
  vf out;
  std::memcpy(&out, &pr, sizeof(out));
#else
  vi bits = (__builtin_convertvector(fl, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf out = p * scale;
#endif
  return under ? Splat(0.0f) : out;
}

// z = gelu(x) = x * Phi(x) and, if d != nullptr, d = gelu'(x) = Phi(x) + x * phi(x), with
// Phi(x) = erfc(-x / sqrt 2) / 2 from Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)
// evaluated on |x| so that the small tail is computed directly, not as 1 - (1 - tail).
inline vf Gelu(vf x, vf* d) {
  const vf u = (x < 0.0f ? -x : x) * 0.70710678118654752f;  // |x| / sqrt 2
  const vf t = 1.0f / (1.0f + 0.3275911f * u);
  vf poly = Splat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  const vf e = VExpNeg(-u * u);                    // exp(-x^2 / 2)
  const vf tail = 0.5f * poly * e;                 // Phi(-|x|)
  const vf phi_cdf = x < 0.0f ? tail : 1.0f - tail;
  if (d != nullptr) *d = phi_cdf + x * e * 0.39894228040143268f;
  return x * phi_cdf;
}

constexpr int64_t kRowsPerItem = 256;

struct Rows {
  int64_t m, c, blocks, items;
  explicit Rows(const ffi::AnyBuffer& x) {
    auto d = x.dimensions();
    c = d.size() == 0 ? 1 : d[d.size() - 1];
    m = c ? static_cast<int64_t>(x.element_count()) / c : 0;
    blocks = (c + VL - 1) / VL;
    items = (m + kRowsPerItem - 1) / kRowsPerItem;
  }
  int lanes(int64_t b) const { return static_cast<int>(std::min<int64_t>(VL, c - b * VL)); }
};

// Runs fn(o, b, lanes) on every channel block of every row: o = row * c + b * VL is the block's
// offset, its channels [b * VL, b * VL + lanes). Items of kRowsPerItem rows are spread over the
// pool; within one, rows and blocks go in memory order (a row's blocks, then the next row's),
// which streams through memory twice as fast here as a block's rows at a stride of c would.
template <typename BlockFn>
void RowBlocks(ffi::ThreadPool& pool, const Rows& r, const BlockFn& fn) {
  ParallelFor(pool, r.items, [&](int64_t item) {
    const int64_t r0 = item * kRowsPerItem, r1 = std::min(r.m, r0 + kRowsPerItem);
    for (int64_t row = r0; row < r1; ++row) {
      for (int64_t b = 0; b < r.blocks; ++b) fn(row * r.c + b * VL, b, r.lanes(b));
    }
  });
}

// Per-channel sums of two row functions: sum_fn(o, b, lanes, s0, s1) adds the block at offset o
// to s0 and s1 in float, rows in order within an item (as RowBlocks walks them); the items'
// partial sums are added in double at the end (so the order, and the result, do not depend on
// the threads).
template <typename SumFn>
void ChannelSums(ffi::ThreadPool& pool, const Rows& r, float* out, const SumFn& sum_fn) {
  std::vector<float> part(r.items * 2 * r.c);
  ParallelFor(pool, r.items, [&](int64_t item) {
    const int64_t r0 = item * kRowsPerItem, r1 = std::min(r.m, r0 + kRowsPerItem);
    thread_local std::vector<vf> acc;
    acc.assign(2 * r.blocks, vf{});
    vf* s0 = acc.data();
    vf* s1 = acc.data() + r.blocks;
    for (int64_t row = r0; row < r1; ++row) {
      for (int64_t b = 0; b < r.blocks; ++b) {
        sum_fn(row * r.c + b * VL, b, r.lanes(b), s0[b], s1[b]);
      }
    }
    float* p = part.data() + item * 2 * r.c;
    for (int64_t b = 0; b < r.blocks; ++b) {
      Store(p + b * VL, s0[b], r.lanes(b));
      Store(p + r.c + b * VL, s1[b], r.lanes(b));
    }
  });
  for (int64_t k = 0; k < 2 * r.c; ++k) {
    double acc = 0.0;
    for (int64_t item = 0; item < r.items; ++item) acc += part[item * 2 * r.c + k];
    out[k] = static_cast<float>(acc);
  }
}

ffi::Error CheckCoef(const ffi::Buffer<ffi::F32>& coef, int64_t rows, int64_t c) {
  auto d = coef.dimensions();
  if (d.size() != 2 || d[0] != rows || d[1] != c) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "coefficients must be (k, C)");
  }
  return ffi::Error::Success();
}

ffi::Error GeluStats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::ResultBuffer<ffi::F32> out) {
  const Rows r(x);
  if (out->element_count() != static_cast<size_t>(2 * r.c)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "stats must be (2, C)");
  }
  return ByType({x.element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    ChannelSums(pool, r, out->typed_data(), [&](int64_t o, int64_t, int lanes, vf& s0, vf& s1) {
      const vf z = Gelu(Load(xp + o, lanes), nullptr);
      s0 += z;
      s1 += z * z;
    });
    return ffi::Error::Success();
  });
}

// x's dtype's rounding of v: v itself in float32, the nearest bfloat16 (widened) in bfloat16.
template <typename T>
inline vf Rounded(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T tmp[VL];
    Store(tmp, v, VL);
    return Load(tmp, VL);
  }
}

ffi::Error GeluStatsSave(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::ResultBuffer<ffi::F32> out,
                         ffi::Result<ffi::AnyBuffer> z, ffi::Result<ffi::AnyBuffer> d) {
  const Rows r(x);
  if (out->element_count() != static_cast<size_t>(2 * r.c)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "stats must be (2, C)");
  }
  if (z->element_count() != x.element_count() || d->element_count() != x.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "z and d must have x's size");
  }
  return ByType({x.element_type(), z->element_type(), d->element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    T* zp = Out<T>(z);
    T* dp = Out<T>(d);
    ChannelSums(pool, r, out->typed_data(), [&](int64_t o, int64_t, int lanes, vf& s0, vf& s1) {
      vf dv;
      const vf zv = Rounded<T>(Gelu(Load(xp + o, lanes), &dv));
      Store(zp + o, zv, lanes);
      Store(dp + o, dv, lanes);
      s0 += zv;
      s1 += zv * zv;
    });
    return ffi::Error::Success();
  });
}

// y = gelu(x) * coef[0] + coef[1], plus r (x's shape and dtype) where r != nullptr: the
// residual add that follows a ConvMixer block's depthwise GELU+BN, in the same pass (in float32,
// rounded once).
// kGelu false: x is the stored z (pemn_bn_fwd, pemn_bn_add_fwd), taken as it is.
template <bool kGelu>
ffi::Error GeluBnFwdImpl(ffi::ThreadPool& pool, const ffi::AnyBuffer& x,
                         const ffi::Buffer<ffi::F32>& coef, const ffi::AnyBuffer* r,
                         ffi::Result<ffi::AnyBuffer>& y) {
  const Rows rows(x);
  if (auto e = CheckCoef(coef, 2, rows.c); e.failure()) return e;
  if (r != nullptr && r->element_count() != x.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "the residual has the wrong size");
  }
  const float* cp = coef.typed_data();
  const ffi::DataType rt = r != nullptr ? r->element_type() : x.element_type();
  return ByType({x.element_type(), y->element_type(), rt}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    const T* rp = r != nullptr ? In<T>(*r) : nullptr;
    T* yp = Out<T>(y);
    RowBlocks(pool, rows, [&](int64_t o, int64_t b, int lanes) {
      const vf mul = Load(cp + b * VL, lanes), shift = Load(cp + rows.c + b * VL, lanes);
      const vf v = Load(xp + o, lanes);
      vf out = (kGelu ? Gelu(v, nullptr) : v) * mul + shift;
      if (rp != nullptr) out += Load(rp + o, lanes);
      Store(yp + o, out, lanes);
    });
    return ffi::Error::Success();
  });
}

ffi::Error GeluBnFwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> coef,
                     ffi::Result<ffi::AnyBuffer> y) {
  return GeluBnFwdImpl<true>(pool, x, coef, nullptr, y);
}

ffi::Error BnFwd(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::Buffer<ffi::F32> coef,
                 ffi::Result<ffi::AnyBuffer> y) {
  return GeluBnFwdImpl<false>(pool, z, coef, nullptr, y);
}

ffi::Error GeluBnAddFwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> coef,
                        ffi::AnyBuffer r, ffi::Result<ffi::AnyBuffer> y) {
  return GeluBnFwdImpl<true>(pool, x, coef, &r, y);
}

ffi::Error BnAddFwd(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::Buffer<ffi::F32> coef,
                    ffi::AnyBuffer r, ffi::Result<ffi::AnyBuffer> y) {
  return GeluBnFwdImpl<false>(pool, z, coef, &r, y);
}

// y = a + b (one shape and dtype), summed in float32 and rounded once, as XLA adds two
// bfloat16 arrays: the two cotangents of an activation used twice (a residual block's input).
ffi::Error Add(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> y) {
  const Rows r(a);
  if (b.element_count() != a.element_count() || y->element_count() != a.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "a, b and y must have one size");
  }
  return ByType({a.element_type(), b.element_type(), y->element_type()}, [&]<typename T>(T) {
    const T* ap = In<T>(a);
    const T* bp = In<T>(b);
    T* yp = Out<T>(y);
    RowBlocks(pool, r, [&](int64_t o, int64_t, int lanes) {
      Store(yp + o, Load(ap + o, lanes) + Load(bp + o, lanes), lanes);
    });
    return ffi::Error::Success();
  });
}

// kGelu false: x is the stored z (pemn_bn_bstats).
template <bool kGelu>
ffi::Error GeluBnBwdStatsImpl(ffi::ThreadPool& pool, const ffi::AnyBuffer& x,
                              const ffi::AnyBuffer& dy, const ffi::Buffer<ffi::F32>& coef,
                              ffi::ResultBuffer<ffi::F32>& out) {
  const Rows r(x);
  if (auto e = CheckCoef(coef, 2, r.c); e.failure()) return e;
  if (dy.element_count() != x.element_count() ||
      out->element_count() != static_cast<size_t>(2 * r.c)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dy or stats have the wrong size");
  }
  const float* cp = coef.typed_data();
  return ByType({x.element_type(), dy.element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    const T* gp = In<T>(dy);
    ChannelSums(pool, r, out->typed_data(), [&](int64_t o, int64_t b, int lanes, vf& s0, vf& s1) {
      const vf mean = Load(cp + b * VL, lanes), rstd = Load(cp + r.c + b * VL, lanes);
      const vf g = Load(gp + o, lanes);
      s0 += g;
      const vf v = Load(xp + o, lanes);
      s1 += g * (((kGelu ? Gelu(v, nullptr) : v) - mean) * rstd);
    });
    return ffi::Error::Success();
  });
}

ffi::Error GeluBnBwdStats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                          ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> out) {
  return GeluBnBwdStatsImpl<true>(pool, x, dy, coef, out);
}

ffi::Error BnBwdStats(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer dy,
                      ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> out) {
  return GeluBnBwdStatsImpl<false>(pool, z, dy, coef, out);
}

ffi::Error GeluBnBwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                     ffi::Buffer<ffi::F32> coef, ffi::Result<ffi::AnyBuffer> dx) {
  const Rows r(x);
  if (auto e = CheckCoef(coef, 3, r.c); e.failure()) return e;
  if (dy.element_count() != x.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dy has the wrong size");
  }
  const float* cp = coef.typed_data();
  return ByType({x.element_type(), dy.element_type(), dx->element_type()}, [&]<typename T>(T) {
    const T* xp = In<T>(x);
    const T* gp = In<T>(dy);
    T* dp = Out<T>(dx);
    RowBlocks(pool, r, [&](int64_t o, int64_t b, int lanes) {
      const vf k = Load(cp + b * VL, lanes), c0 = Load(cp + r.c + b * VL, lanes),
               c1 = Load(cp + 2 * r.c + b * VL, lanes);
      vf d;
      const vf z = Gelu(Load(xp + o, lanes), &d);
      Store(dp + o, (k * Load(gp + o, lanes) + c0 + c1 * z) * d, lanes);
    });
    return ffi::Error::Success();
  });
}

ffi::Error BnBwdSaved(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer d, ffi::AnyBuffer dy,
                      ffi::Buffer<ffi::F32> coef, ffi::Result<ffi::AnyBuffer> dx) {
  const Rows r(z);
  if (auto e = CheckCoef(coef, 3, r.c); e.failure()) return e;
  if (dy.element_count() != z.element_count() || d.element_count() != z.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "d or dy has the wrong size");
  }
  const float* cp = coef.typed_data();
  const auto types = {z.element_type(), d.element_type(), dy.element_type(), dx->element_type()};
  return ByType(types, [&]<typename T>(T) {
    const T* zp = In<T>(z);
    const T* derp = In<T>(d);
    const T* gp = In<T>(dy);
    T* dp = Out<T>(dx);
    RowBlocks(pool, r, [&](int64_t o, int64_t b, int lanes) {
      const vf k = Load(cp + b * VL, lanes), c0 = Load(cp + r.c + b * VL, lanes),
               c1 = Load(cp + 2 * r.c + b * VL, lanes);
      const vf g = Load(gp + o, lanes);
      Store(dp + o, (k * g + c0 + c1 * Load(zp + o, lanes)) * Load(derp + o, lanes), lanes);
    });
    return ffi::Error::Success();
  });
}

// ---- Top-k mask ---------------------------------------------------------------------------

// The total order XLA's TopK comparator uses: as signed integers, these keys order floats
// -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
inline int32_t TotalOrderKey(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits < 0 ? bits ^ 0x7FFFFFFF : bits;
}

ffi::Error TopkMask(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mask, int64_t kept) {
  if (x.element_type() != ffi::DataType::F32 || mask->element_type() != ffi::DataType::F32) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "top-k mask: float32 only");
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (static_cast<int64_t>(mask->element_count()) != n || kept < 0 || kept > n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "top-k mask: bad sizes");
  }
  const float* xp = x.typed_data<float>();
  float* mp = mask->typed_data<float>();
  std::fill(mp, mp + n, 0.0f);
  if (kept == 0) return ffi::Error::Success();
  // (key, index) pairs; larger key first, then lower index first: the kept set is exactly
  // XLA's (stable) TopK's.
  std::vector<std::pair<int32_t, int32_t>> items(n);
  for (int64_t i = 0; i < n; ++i) items[i] = {TotalOrderKey(xp[i]), static_cast<int32_t>(i)};
  auto before = [](const std::pair<int32_t, int32_t>& a, const std::pair<int32_t, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (kept < n) std::nth_element(items.begin(), items.begin() + (kept - 1), items.end(), before);
  for (int64_t i = 0; i < kept; ++i) mp[items[i].second] = 1.0f;
  return ffi::Error::Success();
}

// ---- bfloat16 GEMM through a BLAS handed over at load time --------------------------------

// The BLAS behind pemn_gemm_bf16, handed over by PemnSetGemmBf16 (kind 0 or 1):
//   0: cblas_gemm_bf16bf16f32(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c,
//      ldc) of a single-threaded LP64 MKL (CBLAS enums: row-major 101, no-trans 111, trans 112;
//      MKL_BF16 = uint16_t, MKL_INT = int): called per row block, over XLA's pool;
//   1: dnnl_gemm_bf16bf16f32(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) of
//      oneDNN (row-major, 'N' / 'T', 64-bit dims; status 0 = success): one call, which runs on
//      oneDNN's own OpenMP threads.
using CblasGemmBf16 = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                               const uint16_t*, int, float, float*, int);
using DnnlGemmBf16 = int (*)(char, char, int64_t, int64_t, int64_t, float, const uint16_t*,
                             int64_t, const uint16_t*, int64_t, float, float*, int64_t);
std::atomic<void*> gemm_fn{nullptr};
std::atomic<int> gemm_kind{0};

ffi::Error GemmBf16(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                    ffi::ResultBuffer<ffi::F32> c, int64_t trans_a, int64_t trans_b) {
  void* fn = gemm_fn.load();
  if (fn == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "pemn_gemm_bf16: no BLAS loaded");
  }
  if (a.element_type() != ffi::DataType::BF16 || b.element_type() != ffi::DataType::BF16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_gemm_bf16 takes bfloat16 a, b");
  }
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_gemm_bf16 takes matrices");
  }
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1], kb = trans_b ? bd[1] : bd[0];
  if (k != kb || cd[0] != m || cd[1] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_gemm_bf16: shapes disagree");
  }
  const auto* ap = static_cast<const uint16_t*>(a.untyped_data());
  const auto* bp = static_cast<const uint16_t*>(b.untyped_data());
  float* cp = c->typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  if (gemm_kind.load() == 1) {
    int status = reinterpret_cast<DnnlGemmBf16>(fn)(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m,
                                                    n, k, 1.0f, ap, lda, bp, ldb, 0.0f, cp, n);
    if (status != 0) {
      return ffi::Error(ffi::ErrorCode::kInternal,
                        "dnnl_gemm_bf16bf16f32 failed: status " + std::to_string(status));
    }
    return ffi::Error::Success();
  }
  if (std::max({m, n, k, lda, ldb}) >= (int64_t{1} << 31)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_gemm_bf16: dimension over 2^31");
  }
  // Row blocks of c (multiples of 32 rows), about 4 per thread for balance.
  const int64_t threads = pool.num_threads() + 1;
  const int64_t rows = std::max<int64_t>(32, ((m + 4 * threads - 1) / (4 * threads) + 31) / 32 * 32);
  const int64_t items = (m + rows - 1) / rows;
  ParallelFor(pool, items, [&](int64_t item) {
    const int64_t m0 = item * rows, mm = std::min(rows, m - m0);
    const uint16_t* a0 = trans_a ? ap + m0 : ap + m0 * lda;  // rows of op(a)
    reinterpret_cast<CblasGemmBf16>(fn)(101, trans_a ? 112 : 111, trans_b ? 112 : 111, int(mm),
                                        int(n), int(k), 1.0f, a0, int(lda), bp, int(ldb), 0.0f,
                                        cp + m0 * n, int(n));
  });
  return ffi::Error::Success();
}

// ---- bfloat16 products on AMX tiles -------------------------------------------------------

// pemn_matmul_amx: c = a @ op(b) in bfloat16 (a (M, K), op(b) (K, N): b itself, or b (N, K)
// transposed when trans_b), the float32 sums of exact bfloat16 products rounded once, to
// nearest even, as XLA's bfloat16 dot with a float32 result and its convert give (to the bit
// on every shape tested: XLA:CPU runs that dot on AMX tiles too). K and N multiples of 32.
// A library's GEMM writes the float32 product and XLA's convert then reads it again: here each
// 32-row block of c is summed in the tile registers, stored to a 32 KB buffer in L1 and rounded
// from there, so only a and the bfloat16 c cross memory (a third of the bytes; c is written
// with non-temporal stores, since the next op reads it from memory anyway). The tiles: 2 x 2
// blocks of 16 x 16 float32 sums (16 rows by 32 bfloat16 of a, times 32 by 16 of b), b
// repacked once per call into AMX's pair-interleaved layout. TDPBF16PS reads bfloat16
// denormals as zero and flushes denormal sums (as XLA:CPU's threads do).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PEMN_AMX 1
#endif

#ifdef PEMN_AMX

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// b repacked: tile (nb, kb) holds op(b)[32 kb + 2 r + e][16 nb + n] at [r][2 n + e] (16 rows
// of 64 bytes), the tiles of one 16-column block consecutive in kb.
void PackAmx(const uint16_t* b, bool trans_b, int64_t k, int64_t n, uint16_t* out) {
  for (int64_t nb = 0; nb < n / 16; ++nb) {
    for (int64_t kb = 0; kb < k / 32; ++kb) {
      uint16_t* tile = out + (nb * (k / 32) + kb) * 512;
      for (int64_t r = 0; r < 16; ++r) {
        for (int64_t j = 0; j < 16; ++j) {
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t row = kb * 32 + 2 * r + e, col = nb * 16 + j;
            tile[r * 32 + 2 * j + e] = trans_b ? b[col * k + row] : b[row * n + col];
          }
        }
      }
    }
  }
}

// Rows [m0, m1) of c. Blocks of 32 rows; a last shorter block is copied zero-padded first.
void AmxRows(const uint16_t* a, const uint16_t* packed, uint16_t* c, int64_t k, int64_t n,
             int64_t m0, int64_t m1) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  thread_local std::vector<float> sums;
  thread_local std::vector<uint16_t> tail;
  sums.resize(32 * n);
  const int64_t kbs = k / 32, stride = k * 2;
  const bool aligned = reinterpret_cast<uintptr_t>(c) % 64 == 0;
  for (int64_t mb = m0; mb < m1; mb += 32) {
    const int64_t rows = std::min<int64_t>(32, m1 - mb);
    const uint16_t* a0 = a + mb * k;
    if (rows < 32) {
      tail.assign(32 * k, 0);
      std::memcpy(tail.data(), a0, rows * k * sizeof(uint16_t));
      a0 = tail.data();
    }
    const uint16_t* a1 = a0 + 16 * k;
    for (int64_t np = 0; np < n / 32; ++np) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* b0 = packed + 2 * np * kbs * 512;
      const uint16_t* b1 = b0 + kbs * 512;
      for (int64_t kb = 0; kb < kbs; ++kb) {
        _tile_loadd(4, a0 + kb * 32, stride);
        _tile_loadd(5, a1 + kb * 32, stride);
        _tile_loadd(6, b0 + kb * 512, 64);
        _tile_loadd(7, b1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* s = sums.data() + np * 32;
      _tile_stored(0, s, n * 4);
      _tile_stored(1, s + 16, n * 4);
      _tile_stored(2, s + 16 * n, n * 4);
      _tile_stored(3, s + 16 * n + 16, n * 4);
    }
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* out = c + (mb + r) * n;
      const float* s = sums.data() + r * n;
      for (int64_t j = 0; j < n; j += 32) {
        alignas(64) uint16_t h[32];
        Store(h, Load(s + j, VL), VL);
        Store(h + 16, Load(s + j + 16, VL), VL);
        __m512i v;
        std::memcpy(&v, h, sizeof(v));
        if (aligned) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), v);
        } else {
          _mm512_storeu_si512(out + j, v);
        }
      }
    }
  }
  _mm_sfence();
  _tile_release();
}

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
bool AmxPermitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}
#else
bool AmxPermitted() { return false; }
#endif

ffi::Error MatmulAmx(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                     ffi::Result<ffi::AnyBuffer> c, int64_t trans_b) {
  if (!AmxPermitted()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "pemn_matmul_amx: no AMX-BF16 (not built for it, or refused by the OS)");
  }
  if (a.element_type() != ffi::DataType::BF16 || b.element_type() != ffi::DataType::BF16 ||
      c->element_type() != ffi::DataType::BF16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_matmul_amx takes bfloat16 only");
  }
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_matmul_amx takes matrices");
  }
  const int64_t m = ad[0], k = ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1], kb = trans_b ? bd[1] : bd[0];
  if (k != kb || cd[0] != m || cd[1] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pemn_matmul_amx: shapes disagree");
  }
  if (k % 32 != 0 || n % 32 != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "pemn_matmul_amx: K and N must be multiples of 32");
  }
#ifdef PEMN_AMX
  std::vector<uint16_t> packed(k * n);
  PackAmx(static_cast<const uint16_t*>(b.untyped_data()), trans_b != 0, k, n, packed.data());
  const auto* ap = static_cast<const uint16_t*>(a.untyped_data());
  auto* cp = static_cast<uint16_t*>(c->untyped_data());
  constexpr int64_t kRows = 256;  // rows of c per work item
  ParallelFor(pool, (m + kRows - 1) / kRows, [&](int64_t item) {
    AmxRows(ap, packed.data(), cp, k, n, item * kRows, std::min(m, (item + 1) * kRows));
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

// Hands over the bf16 GEMM of kind 0 (MKL's CBLAS) or 1 (oneDNN), see above; null: none.
extern "C" void PemnSetGemmBf16(void* fn, int kind) {
  gemm_kind.store(kind);
  gemm_fn.store(fn);
}

// 1 when pemn_matmul_amx can run here: built for AMX-BF16, and the OS grants the tile state.
extern "C" int PemnAmxReady() { return AmxPermitted() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnGemmBf16, GemmBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));

// Every handler but the top-k takes XLA's thread pool; activations (ANY) are float32 or bfloat16,
// kernels, coefficients and statistics float32.
#define PEMN_POOL ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
#define PEMN_F32 ffi::Buffer<ffi::F32>
#define PEMN_ANY ffi::AnyBuffer

XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnGeluStats, GeluStats, PEMN_POOL.Arg<PEMN_ANY>().Ret<PEMN_F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnGeluBnFwd, GeluBnFwd,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnGeluBnAddFwd, GeluBnAddFwd,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_F32>().Arg<PEMN_ANY>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnGeluBnBwdStats, GeluBnBwdStats,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnGeluBnBwd, GeluBnBwd,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnGeluStatsSave, GeluStatsSave,
    PEMN_POOL.Arg<PEMN_ANY>().Ret<PEMN_F32>().Ret<PEMN_ANY>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnBnFwd, BnFwd,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnBnAddFwd, BnAddFwd,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_F32>().Arg<PEMN_ANY>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnBnBwdStats, BnBwdStats,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PemnBnBwdSaved, BnBwdSaved,
    PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnAdd, Add,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Ret<PEMN_ANY>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnDwFwd, DwFwd,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_F32>().Ret<PEMN_ANY>()
                                  .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnDwKgrad, DwKgrad,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Ret<PEMN_F32>()
                                  .Attr<int64_t>("pad_h").Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnMatmulAmx, MatmulAmx,
                              PEMN_POOL.Arg<PEMN_ANY>().Arg<PEMN_ANY>().Ret<PEMN_ANY>()
                                  .Attr<int64_t>("trans_b"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnTopkMask, TopkMask,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kept"));
