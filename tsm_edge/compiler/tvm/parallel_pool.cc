// tsm-edge's parallel launcher, linked into every CPU artifact's library.
//
// TVM's generated code runs each parallel loop through the function pointer
// __TVMBackendParallelLaunch(lambda, closure, num_task); the lambda computes its slice of the
// loop from (task_id, num_task). TVM's own pool runs exactly one task per thread, each on its
// thread: when another process holds one core, the thread sharing it stalls every parallel loop
// and the frame waits for it (on 2 cores, MobileNetV2-TSM went from about 14 to 108 ms).
//
// This launcher splits each loop into `chunks` tasks per thread and lets the threads take them
// one at a time from a shared ticket, the caller included: a preempted thread delays only the
// task it holds, the others take the rest. A lambda that needs a barrier between its tasks
// (TVMBackendParallelBarrier) would deadlock under this scheme; tsm-edge installs the launcher
// only into libraries that do not reference that barrier.
//
// Exposed as two TVM FFI functions of the library (callable locally and over RPC):
//   tsm_edge_pool_install(threads, chunks[, spin]) -> threads   (spin: pause loops a worker waits
//                                                   before it sleeps; threads <= 0: restore TVM's launcher;
//                                                   -2: the library needs TVM's barrier;
//                                                   -3: the library has no parallel loop)
//   tsm_edge_pool_info() -> installed * 1e6 + threads * 1e3 + chunks
#include <tvm/ffi/c_api.h>

#include <atomic>
#include <cstdint>
#include <pthread.h>
#include <thread>
#include <vector>

extern "C" {
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*FTVMParallelLaunch)(FTVMParallelLambda flambda, void* cdata, int num_task);
// Defined (weak) by TVM's code generator in this same library when some loop is parallel; TVM
// sets it when it loads the library. Absent (null here) in a library without parallel loops.
extern void* __TVMBackendParallelLaunch __attribute__((weak));
// Present (weak, defined by the code generator) only where some loop synchronizes its tasks.
extern void* __TVMBackendParallelBarrier __attribute__((weak));
}

namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxTasks = 0xFFFF;
constexpr int kDefaultSpin = 20000;  // pause loops (about 50-200 us) before a worker sleeps

// ticket: generation (24 bits) | task count (16) | next task index (24)
inline uint64_t pack(uint64_t gen, uint64_t ntask, uint64_t index) {
  return (gen << 40) | (ntask << 24) | index;
}
inline uint32_t gen_of(uint64_t t) { return static_cast<uint32_t>(t >> 40); }
inline uint32_t ntask_of(uint64_t t) { return static_cast<uint32_t>((t >> 24) & 0xFFFF); }
inline uint32_t index_of(uint64_t t) { return static_cast<uint32_t>(t & 0xFFFFFF); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield" ::: "memory");
#endif
}

struct Pool {
  std::atomic<uint64_t> ticket{0};
  std::atomic<int> done{0};
  std::atomic<int> failed{0};
  std::atomic<int> sleepers{0};
  std::atomic<int> active{1};  // threads taking tasks, the caller included
  std::atomic<bool> stop{false};
  FTVMParallelLambda flambda = nullptr;
  void* cdata = nullptr;
  TVMParallelGroupEnv env{nullptr, 0};
  int chunks = 4;
  std::atomic<int> spin{kDefaultSpin};
  // pthread's, not std::condition_variable: GCC 12's libstdc++ versions its wait() as
  // GLIBCXX_3.4.30, which would make every artifact need a 2022 libstdc++ on the board
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
  std::vector<std::thread> workers;
  void* tvm_launch = nullptr;  // TVM's own, restored on uninstall
  bool installed = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destructors
  return *p;
}

thread_local bool in_task = false;

// Take and run tasks of the job in ``t``'s generation until none is left.
void take_tasks(Pool& p, uint32_t gen) {
  for (;;) {
    uint64_t t = p.ticket.load(std::memory_order_acquire);
    if (gen_of(t) != gen || index_of(t) >= ntask_of(t)) return;
    if (!p.ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
    in_task = true;
    TVMParallelGroupEnv env = p.env;
    if ((*p.flambda)(static_cast<int>(index_of(t)), &env, p.cdata) != 0) p.failed.store(1);
    in_task = false;
    p.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

void worker(int id) {
  Pool& p = pool();
  uint32_t seen = gen_of(p.ticket.load());
  for (;;) {
    int spins = 0;
    uint64_t t;
    for (;;) {
      t = p.ticket.load(std::memory_order_acquire);
      if (p.stop.load()) return;
      if (gen_of(t) != seen) break;
      if (++spins < p.spin.load(std::memory_order_relaxed)) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&p.mu);
      p.sleepers.fetch_add(1);
      while (!p.stop.load() && gen_of(p.ticket.load()) == seen) pthread_cond_wait(&p.cv, &p.mu);
      p.sleepers.fetch_sub(1);
      pthread_mutex_unlock(&p.mu);
      spins = 0;
    }
    seen = gen_of(t);
    if (id < p.active.load(std::memory_order_relaxed)) take_tasks(p, seen);
  }
}

int launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  Pool& p = pool();
  int threads = p.active.load(std::memory_order_relaxed);
  if (in_task || threads <= 1) {  // nested, or one thread: the whole loop as one task
    TVMParallelGroupEnv env{nullptr, 1};
    return (*flambda)(0, &env, cdata) == 0 ? 0 : -1;
  }
  int ntask = num_task > 0 ? num_task : threads * p.chunks;
  if (ntask > kMaxTasks) ntask = kMaxTasks;
  p.flambda = flambda;
  p.cdata = cdata;
  p.env = TVMParallelGroupEnv{nullptr, ntask};
  p.done.store(0);
  p.failed.store(0);
  uint32_t gen = (gen_of(p.ticket.load()) + 1) & 0xFFFFFF;
  p.ticket.store(pack(gen, ntask, 0), std::memory_order_release);
  if (p.sleepers.load() > 0) {
    pthread_mutex_lock(&p.mu);
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
  }
  take_tasks(p, gen);
  while (p.done.load(std::memory_order_acquire) < ntask) cpu_relax();
  return p.failed.load() ? -1 : 0;
}

void stop_workers(Pool& p) {
  pthread_mutex_lock(&p.mu);
  p.stop.store(true);
  pthread_cond_broadcast(&p.cv);
  pthread_mutex_unlock(&p.mu);
  for (auto& w : p.workers) w.join();
  p.workers.clear();
  p.stop.store(false);
}

int install(int threads, int chunks, int spin) {
  Pool& p = pool();
  if (threads <= 0) {
    if (p.installed && &__TVMBackendParallelLaunch != nullptr) {
      __TVMBackendParallelLaunch = p.tvm_launch;
      stop_workers(p);
      p.installed = false;
    }
    return 0;
  }
  if (&__TVMBackendParallelBarrier != nullptr) return -2;  // tasks must run side by side
  if (&__TVMBackendParallelLaunch == nullptr) return -3;   // no parallel loop to take over
  if (threads > kMaxThreads) threads = kMaxThreads;
  p.chunks = chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
  if (spin >= 0) p.spin.store(spin);
  if (!p.installed) {
    p.tvm_launch = __TVMBackendParallelLaunch;
    p.installed = true;
  }
  // workers 1..threads-1 (the caller is thread 0); more are started, none are stopped
  for (int id = static_cast<int>(p.workers.size()) + 1; id < threads; ++id) {
    p.workers.emplace_back(worker, id);
  }
  p.active.store(threads);
  __TVMBackendParallelLaunch = reinterpret_cast<void*>(&launch);
  return threads;
}

int64_t arg_int(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFIInt || a->type_index == kTVMFFIBool) return a->v_int64;
  if (a->type_index == kTVMFFIFloat) return static_cast<int64_t>(a->v_float64);
  return 0;
}

}  // namespace

extern "C" {

TVM_FFI_DLL_EXPORT int __tvm_ffi_tsm_edge_pool_install(void*, const TVMFFIAny* args,
                                                        int32_t num_args, TVMFFIAny* result) {
  if (num_args != 2 && num_args != 3) {
    TVMFFIErrorSetRaisedFromCStr("ValueError", "tsm_edge_pool_install(threads, chunks[, spin])");
    return -1;
  }
  int spin = num_args == 3 ? static_cast<int>(arg_int(&args[2])) : -1;
  int n = install(static_cast<int>(arg_int(&args[0])), static_cast<int>(arg_int(&args[1])), spin);
  result->type_index = kTVMFFIInt;
  result->v_int64 = n;
  return 0;
}

TVM_FFI_DLL_EXPORT int __tvm_ffi_tsm_edge_pool_info(void*, const TVMFFIAny*, int32_t,
                                                     TVMFFIAny* result) {
  Pool& p = pool();
  result->type_index = kTVMFFIInt;
  result->v_int64 = (p.installed ? 1000000 : 0) + p.active.load() * 1000 + p.chunks;
  return 0;
}

}  // extern "C"
