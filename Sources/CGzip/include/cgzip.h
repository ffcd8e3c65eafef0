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

/// The first `wanted` bytes of a gzip stream's decompressed data (fewer when it is shorter), without
/// decompressing the rest: a header read before anything is allocated. Returns 0, or non-zero as
/// above when the data is not gzip or is corrupt before that point.
int cgzip_peek(const uint8_t *input, size_t input_length, uint8_t *output, size_t wanted, size_t *output_length);

#endif
