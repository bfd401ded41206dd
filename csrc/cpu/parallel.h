// parallel_for for the nmkern CPU kernels: a small work-claiming thread pool
// (nmkern_cpu_set_threading(0), the library's initial mode) or an OpenMP `parallel for`
// (nmkern_cpu_set_threading(1)); nmkern/_cpu.py sets the mode at load (NMKERN_CPU_THREADING:
// by default OpenMP when the library shares torch's OpenMP runtime, so it runs on torch's team).
//
// Why a pool: an OpenMP region ends in a barrier that waits for every thread of
// the team, including one the OS has not scheduled yet. On the shared 2-core
// machine this was measured at ~30 ms per call for a 0.1 ms layer (MiniLM
// 384x1536, batch 1: median 31.6 ms with 2 OpenMP threads vs 0.08 ms on one).
// Here the calling thread claims chunks like the workers do and waits only for
// chunks a worker has actually claimed; a worker that wakes late finds no work
// left. A forked child (no worker threads) simply runs everything itself.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace nmkern {

enum class Threading : int { kPool = 0, kOpenMP = 1 };

Threading threading_mode();

// Body gets a half-open chunk [begin, end) of [0, count).
using RangeFn = std::function<void(int64_t, int64_t)>;

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static teardown
    return *pool;
  }

  void run(int64_t count, int64_t chunk, int nthreads, const RangeFn& fn) {
    if (count <= 0) return;
    chunk = std::max<int64_t>(1, chunk);
    if (nthreads <= 1 || count <= chunk) {
      fn(0, count);
      return;
    }
    std::unique_lock<std::mutex> call(call_mutex_);  // one parallel_for at a time per process
    ensure_workers(nthreads - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      count_ = count;
      chunk_ = chunk;
      next_.store(0, std::memory_order_relaxed);
      open_ = true;
      wanted_ = nthreads - 1;
      ++epoch_;
    }
    cv_.notify_all();
    claim_loop();
    std::unique_lock<std::mutex> lk(m_);
    open_ = false;  // late workers see a closed job and go back to sleep
    done_cv_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  Pool() = default;

  void claim_loop() {
    for (;;) {
      const int64_t b = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (b >= count_) return;
      (*fn_)(b, std::min(count_, b + chunk_));
    }
  }

  void ensure_workers(int n) {
    std::lock_guard<std::mutex> lk(m_);
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { worker(id); });
      workers_.back().detach();
    }
  }

  void worker(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return epoch_ != seen; });
        seen = epoch_;
        if (!open_ || id >= wanted_) continue;
        ++active_;
      }
      claim_loop();
      {
        std::lock_guard<std::mutex> lk(m_);
        if (--active_ == 0) done_cv_.notify_all();
      }
    }
  }

  std::mutex call_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const RangeFn* fn_ = nullptr;
  int64_t count_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  bool open_ = false;
  int wanted_ = 0, active_ = 0;
  uint64_t epoch_ = 0;
};

// Runs fn over [0, count) in chunks of `chunk` on up to `nthreads` threads.
inline void parallel_for(int64_t count, int64_t chunk, int nthreads, const RangeFn& fn) {
  if (threading_mode() == Threading::kOpenMP) {
    const int64_t chunks = (count + chunk - 1) / std::max<int64_t>(1, chunk);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) fn(c * chunk, std::min(count, (c + 1) * chunk));
    return;
  }
  Pool::instance().run(count, chunk, nthreads, fn);
}

}  // namespace nmkern
