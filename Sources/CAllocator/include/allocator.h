#ifndef SYNCBN_ALLOCATOR_H
#define SYNCBN_ALLOCATOR_H
/// Keeps freed heap blocks of up to 32 MiB (glibc's largest mmap threshold) in the process
/// instead of returning them to the kernel: training allocates tensors of the same sizes every
/// step, and without this each step page-faults them in again. Returns 0 on success.
int syncbn_keep_freed_memory(void);
#endif
