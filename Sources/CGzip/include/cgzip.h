#ifndef CGZIP_H
#define CGZIP_H
#include <stddef.h>
#include <stdint.h>

/// Decompresses a gzip stream (one or more concatenated members) with zlib.
/// On success returns 0 and sets *output (malloc'd, the caller frees it) and *output_length.
/// On failure returns non-zero and writes a message of at most message_capacity bytes:
/// 1 = not gzip data, 2 = corrupt or truncated, 3 = output would exceed max_output, 4 = out of memory.
int cgzip_decompress(const uint8_t *input, size_t input_length, size_t max_output,
                     uint8_t **output, size_t *output_length, char *message, size_t message_capacity);

#endif
