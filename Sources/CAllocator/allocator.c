#include "allocator.h"
#include <malloc.h>

int syncbn_keep_freed_memory(void) {
#ifdef M_MMAP_THRESHOLD
    int ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) && mallopt(M_TRIM_THRESHOLD, 1 << 30);
    return ok ? 0 : -1;
#else
    return -1;
#endif
}
