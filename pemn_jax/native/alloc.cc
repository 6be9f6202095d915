// A cache for large allocations, preloaded into a training process (LD_PRELOAD).
//
// XLA:CPU allocates each execution's temporary buffer (hundreds of MB to GB for a training step)
// with malloc and frees it when the step ends. glibc serves anything that large with a fresh
// mmap and returns it with munmap, so every step the kernel faults in and zeroes the whole
// buffer again: a quarter of a 2-core machine's CPU time in a ConvMixer step, spent in the
// kernel. This library keeps such blocks mapped after free and hands them out again to the next
// request of a size that fits, so a steady training loop stops faulting after its first steps.
//
// Only requests of at least kThreshold bytes are served here; all others go to glibc's own
// allocator (__libc_malloc and friends, which glibc exports for wrappers like this one). glibc
// supports replacing malloc by symbol interposition, and its own internal calls go through the
// interposed functions, so every pointer handed out here comes back here.
//
// Layout: one reserved range of virtual memory (PROT_NONE, no swap reserved) is carved into
// blocks of whole 2 MB units from its start; a pointer is ours iff it lies in the range. Each
// block starts with a one-page header; the user's pointer follows it (aligned as asked). A freed
// block keeps its pages and joins the cache; a request takes the smallest cached block that
// fits and is at most 1.5x its size, else new address space. When the cache holds more than its
// cap (PEMN_ALLOC_CACHE_MB, default a quarter of physical memory), the least recently freed
// blocks give their pages back (MADV_DONTNEED) and keep their address range for later. Address
// space exhausted: glibc serves the request (correct, only slower).
//
// Counters for tests and records: pemn_alloc_stats(out[5]) fills {blocks served from the cache,
// blocks newly mapped, bytes cached now, bytes live now, requests passed to glibc past the
// reserve}.
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
}

namespace {

constexpr size_t kThreshold = size_t{4} << 20;  // requests this large or larger are cached
constexpr size_t kUnit = size_t{2} << 20;       // block sizes are multiples (a huge page)
constexpr size_t kPage = 4096;                  // the header's room before the user pointer
constexpr size_t kReserve = size_t{1} << 40;    // address space reserved (1 TB, no memory)
constexpr uint64_t kMagic = 0x70656d6e616c6f63;  // "pemnaloc"
constexpr int kMaxCached = 4096;

struct Header {
  uint64_t magic;
  char* block;       // the block's start (this header's address)
  size_t size;       // the block's bytes
  size_t requested;  // the user's bytes
};

struct Cached {
  char* block;
  size_t size;
  uint64_t freed_at;  // a counter: larger is more recent
  bool resident;      // pages still held (false once given back)
};

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
char* base = nullptr;  // the reserved range [base, base + kReserve)
char* next = nullptr;  // first unused byte of it
bool reserve_failed = false;
Cached cache[kMaxCached];
int cached_count = 0;
uint64_t clock_ticks = 0;
size_t cap = 0;
int64_t stats[5] = {0, 0, 0, 0, 0};  // reused, mapped, cached bytes, live bytes, to glibc

inline bool Ours(const void* p) {
  const char* c = static_cast<const char*>(p);
  return base != nullptr && c >= base && c < base + kReserve;
}

size_t CacheCap() {
  if (const char* env = getenv("PEMN_ALLOC_CACHE_MB")) {
    char* end = nullptr;
    const unsigned long long mb = strtoull(env, &end, 10);
    if (end != env && *end == '\0') return static_cast<size_t>(mb) << 20;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return size_t{1} << 30;
  return static_cast<size_t>(pages) * static_cast<size_t>(page) / 4;
}

bool Reserve() {
  if (base != nullptr) return true;
  if (reserve_failed) return false;
  void* p = mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    reserve_failed = true;
    return false;
  }
  // Start on a unit boundary so that blocks can be backed by huge pages.
  char* start = static_cast<char*>(p);
  base = start;
  next = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(start) + kUnit - 1) & ~(kUnit - 1));
  cap = CacheCap();
  return true;
}

// Gives back the pages of the least recently freed resident blocks until the cache's resident
// bytes are within the cap.
void Trim() {
  while (stats[2] > static_cast<int64_t>(cap)) {
    int oldest = -1;
    for (int i = 0; i < cached_count; ++i) {
      if (cache[i].resident && (oldest < 0 || cache[i].freed_at < cache[oldest].freed_at)) {
        oldest = i;
      }
    }
    if (oldest < 0) return;
    madvise(cache[oldest].block, cache[oldest].size, MADV_DONTNEED);
    cache[oldest].resident = false;
    stats[2] -= static_cast<int64_t>(cache[oldest].size);
  }
}

// A block of at least `size` bytes (a multiple of kUnit) from the cache or from new address
// space, its size in *got; nullptr if neither has one. *fresh: its pages are known to be zero.
char* TakeBlock(size_t size, size_t* got, bool* fresh) {
  int best = -1;
  for (int i = 0; i < cached_count; ++i) {
    const size_t s = cache[i].size;
    if (s < size || s > size + size / 2) continue;
    if (best < 0 || s < cache[best].size ||
        (s == cache[best].size && cache[i].resident && !cache[best].resident)) {
      best = i;
    }
  }
  if (best >= 0) {
    char* block = cache[best].block;
    *got = cache[best].size;
    *fresh = !cache[best].resident;
    if (cache[best].resident) stats[2] -= static_cast<int64_t>(cache[best].size);
    stats[0] += 1;
    cache[best] = cache[--cached_count];
    return block;
  }
  if (!Reserve() || static_cast<size_t>(base + kReserve - next) < size) return nullptr;
  char* block = next;
  if (mprotect(block, size, PROT_READ | PROT_WRITE) != 0) return nullptr;
  madvise(block, size, MADV_HUGEPAGE);
  next += size;
  stats[1] += 1;
  *got = size;
  *fresh = true;
  return block;
}

// The user pointer of a new allocation of n bytes aligned to `align` (a power of two), zeroed
// if asked; nullptr where the cache cannot serve it (the caller then asks glibc).
void* Allocate(size_t n, size_t align, bool zero) {
  if (align < 16) align = 16;
  const size_t offset = align > kPage ? align : kPage;  // the user pointer's place in the block
  if (n > kReserve / 2) return nullptr;
  const size_t size = (n + offset + kUnit - 1) & ~(kUnit - 1);
  size_t got = 0;
  bool fresh = false;
  pthread_mutex_lock(&mu);
  char* block = TakeBlock(size, &got, &fresh);
  if (block == nullptr) {
    stats[4] += 1;
  } else {
    stats[3] += static_cast<int64_t>(got);
  }
  pthread_mutex_unlock(&mu);
  if (block == nullptr) return nullptr;
  char* user = block + offset;
  Header* h = reinterpret_cast<Header*>(user - kPage);
  *h = Header{kMagic, block, got, n};
  if (zero && !fresh) std::memset(user, 0, n);
  return user;
}

Header* HeaderOf(void* p) { return reinterpret_cast<Header*>(static_cast<char*>(p) - kPage); }

void Release(void* p) {
  Header* h = HeaderOf(p);
  if (h->magic != kMagic) abort();  // not a pointer this library handed out
  char* block = h->block;
  const size_t size = h->size;
  h->magic = 0;
  pthread_mutex_lock(&mu);
  stats[3] -= static_cast<int64_t>(size);
  if (cached_count == kMaxCached) {  // full: the oldest entry gives its pages back and goes
    int oldest = 0;
    for (int i = 1; i < cached_count; ++i) {
      if (cache[i].freed_at < cache[oldest].freed_at) oldest = i;
    }
    if (cache[oldest].resident) stats[2] -= static_cast<int64_t>(cache[oldest].size);
    // Its address range is abandoned (mapped, no pages): only a pathological mix of sizes
    // gets here.
    madvise(cache[oldest].block, cache[oldest].size, MADV_DONTNEED);
    cache[oldest] = cache[--cached_count];
  }
  cache[cached_count++] = Cached{block, size, ++clock_ticks, true};
  stats[2] += static_cast<int64_t>(size);
  Trim();
  pthread_mutex_unlock(&mu);
}

size_t UsableSize(void* p) {
  Header* h = HeaderOf(p);
  return h->size - static_cast<size_t>(static_cast<char*>(p) - h->block);
}

bool IsPowerOfTwo(size_t a) { return a != 0 && (a & (a - 1)) == 0; }

void AtforkPrepare() { pthread_mutex_lock(&mu); }
void AtforkRelease() { pthread_mutex_unlock(&mu); }
__attribute__((constructor)) void Init() {
  pthread_atfork(AtforkPrepare, AtforkRelease, AtforkRelease);
}

}  // namespace

extern "C" {

void* malloc(size_t n) {
  if (n >= kThreshold) {
    if (void* p = Allocate(n, 16, false)) return p;
  }
  return __libc_malloc(n);
}

void free(void* p) {
  if (p == nullptr) return;
  if (Ours(p)) return Release(p);
  __libc_free(p);
}

void* calloc(size_t count, size_t n) {
  size_t total;
  if (__builtin_mul_overflow(count, n, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  if (total >= kThreshold) {
    if (void* p = Allocate(total, 16, true)) return p;
  }
  return __libc_calloc(count, n);
}

void* realloc(void* p, size_t n) {
  if (p == nullptr) return malloc(n);
  if (!Ours(p)) {
    if (n < kThreshold) return __libc_realloc(p, n);
    // Growing a glibc block past the threshold: into a cached one.
    const size_t old = malloc_usable_size(p);
    void* q = malloc(n);
    if (q == nullptr) return nullptr;
    std::memcpy(q, p, old < n ? old : n);
    __libc_free(p);
    return q;
  }
  if (n == 0) {
    free(p);
    return nullptr;
  }
  const size_t usable = UsableSize(p);
  if (n <= usable && n >= kThreshold) {
    HeaderOf(p)->requested = n;
    return p;
  }
  void* q = malloc(n);
  if (q == nullptr) return nullptr;
  const size_t keep = HeaderOf(p)->requested;
  std::memcpy(q, p, keep < n ? keep : n);
  free(p);
  return q;
}

void* reallocarray(void* p, size_t count, size_t n) {
  size_t total;
  if (__builtin_mul_overflow(count, n, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, total);
}

int posix_memalign(void** out, size_t align, size_t n) {
  if (!IsPowerOfTwo(align) || align % sizeof(void*) != 0) return EINVAL;
  if (n >= kThreshold) {
    if (void* p = Allocate(n, align, false)) {
      *out = p;
      return 0;
    }
  }
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}

void* memalign(size_t align, size_t n) {
  if (n >= kThreshold && IsPowerOfTwo(align)) {
    if (void* p = Allocate(n, align, false)) return p;
  }
  return __libc_memalign(align, n);  // glibc's own rules for any other alignment
}

void* aligned_alloc(size_t align, size_t n) { return memalign(align, n); }

void* valloc(size_t n) { return aligned_alloc(kPage, n); }

void* pvalloc(size_t n) { return aligned_alloc(kPage, (n + kPage - 1) & ~(kPage - 1)); }

size_t malloc_usable_size(void* p) {
  if (p == nullptr) return 0;
  if (Ours(p)) return UsableSize(p);
  // glibc exports no __libc_ name for this one: its own symbol, next after this library.
  using Fn = size_t (*)(void*);
  static Fn glibc = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return glibc != nullptr ? glibc(p) : 0;
}

// The counters described at the top, for tests and benchmark records.
void pemn_alloc_stats(int64_t* out) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < 5; ++i) out[i] = stats[i];
  pthread_mutex_unlock(&mu);
}

}  // extern "C"
