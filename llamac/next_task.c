/* Linked into every compiled model library (llamac.tvm_build): the kernels' parallel loops take their tasks from a
   shared counter through these functions, so that a core slowed down by other work (memory traffic, the host's other
   jobs, a late start) takes fewer tasks instead of making the other cores wait. TVM's CPU code generator has no
   atomics. */
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* tvm::runtime::threading::NumThreads(), exported by the TVM runtime the library is loaded into: the size of the
   calling thread's pool. Weak, so that a runtime without it still loads the library. */
extern int32_t llamac_tvm_num_threads(void) __asm__("_ZN3tvm7runtime9threading10NumThreadsEv") __attribute__((weak));

/* The next task index. */
__attribute__((visibility("hidden"))) int32_t llamac_next_task(int32_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

/* Threads of the pool a parallel loop started here will use (1 when the runtime does not say). Call it outside the
   loop: on a pool's worker thread TVM would make that thread a pool of its own. */
__attribute__((visibility("hidden"))) int32_t llamac_threads(void) {
    int32_t n = llamac_tvm_num_threads ? llamac_tvm_num_threads() : 1;
    return n > 0 ? n : 1;
}

/* The next chunk of tasks [start, *end) out of n: 1/parts of those left (at least one), so that the first chunks are
   long contiguous runs and the last ones short enough to even out the cores' finish. Returns start (n when none
   are left). */
__attribute__((visibility("hidden"))) int32_t llamac_next_chunk(int32_t *counter, int32_t n, int32_t parts,
                                                                int32_t *end) {
    int32_t start = __atomic_load_n(counter, __ATOMIC_RELAXED);
    for (;;) {
        if (start >= n) return n;
        int32_t size = (n - start) / parts;
        if (size < 1) size = 1;
        if (__atomic_compare_exchange_n(counter, &start, start + size, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *end = start + size;
            return start;
        }
    }
}

#ifdef __cplusplus
}
#endif
