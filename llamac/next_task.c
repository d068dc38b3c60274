/* Linked into every compiled model library (llamac.tvm_build): the kernels' parallel loops take their tasks from a
   shared counter through this function, so that a core slowed down by other work (memory traffic, the host's other
   jobs) takes fewer tasks instead of making the other cores wait. TVM's CPU code generator has no atomic add. */
#include <stdint.h>

#ifdef __cplusplus
extern "C"
#endif
__attribute__((visibility("hidden"))) int32_t llamac_next_task(int32_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}
