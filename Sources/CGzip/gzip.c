#include "cgzip.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static int fail(int code, char *message, size_t capacity, const char *text, z_stream *stream, uint8_t *buffer) {
    if (capacity > 0) snprintf(message, capacity, "%s", text);
    if (stream) inflateEnd(stream);
    free(buffer);
    return code;
}

int cgzip_decompress(const uint8_t *input, size_t input_length, size_t max_output,
                     uint8_t **output, size_t *output_length, char *message, size_t message_capacity) {
    *output = NULL;
    *output_length = 0;
    if (input_length < 2 || input[0] != 0x1f || input[1] != 0x8b)
        return fail(1, message, message_capacity, "not gzip data", NULL, NULL);
    size_t capacity = input_length * 4 + 1024, used = 0;
    if (capacity > max_output + 1) capacity = max_output + 1;
    uint8_t *buffer = malloc(capacity);
    if (!buffer) return fail(4, message, message_capacity, "out of memory", NULL, NULL);
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    if (inflateInit2(&stream, 16 + MAX_WBITS) != Z_OK)
        return fail(4, message, message_capacity, "zlib initialisation failed", NULL, buffer);
    size_t consumed = 0;
    for (;;) {
        size_t chunk = input_length - consumed;
        if (chunk > 1u << 30) chunk = 1u << 30;
        stream.next_in = (Bytef *)(input + consumed);
        stream.avail_in = (uInt)chunk;
        int status;
        do {
            if (used == capacity) {
                if (capacity > max_output)
                    return fail(3, message, message_capacity, "decompressed data exceeds the size limit", &stream, buffer);
                size_t grown = capacity * 2;
                if (grown > max_output + 1) grown = max_output + 1;
                uint8_t *bigger = realloc(buffer, grown);
                if (!bigger) return fail(4, message, message_capacity, "out of memory", &stream, buffer);
                buffer = bigger;
                capacity = grown;
            }
            size_t room = capacity - used;
            if (room > 1u << 30) room = 1u << 30;
            stream.next_out = buffer + used;
            stream.avail_out = (uInt)room;
            status = inflate(&stream, Z_NO_FLUSH);
            used += room - stream.avail_out;
            if (status == Z_NEED_DICT || status == Z_DATA_ERROR || status == Z_MEM_ERROR)
                return fail(2, message, message_capacity, stream.msg ? stream.msg : "corrupt gzip data", &stream, buffer);
            if (used > max_output)
                return fail(3, message, message_capacity, "decompressed data exceeds the size limit", &stream, buffer);
        } while (status != Z_STREAM_END && (stream.avail_in > 0 || stream.avail_out == 0));
        consumed += chunk - stream.avail_in;
        if (status == Z_STREAM_END) {
            // Another member may follow (gzip allows concatenation); trailing zeros are padding.
            size_t rest = input_length - consumed;
            int more = 0;
            for (size_t i = 0; i < rest; i++) if (input[consumed + i] != 0) { more = 1; break; }
            if (!more) break;
            if (rest < 2 || input[consumed] != 0x1f || input[consumed + 1] != 0x8b)
                return fail(2, message, message_capacity, "trailing garbage after the gzip data", &stream, buffer);
            inflateReset(&stream);
            continue;
        }
        if (consumed >= input_length)
            return fail(2, message, message_capacity, "truncated gzip data (unexpected end of file)", &stream, buffer);
    }
    inflateEnd(&stream);
    *output = buffer;
    *output_length = used;
    return 0;
}

int cgzip_peek(const uint8_t *input, size_t input_length, uint8_t *output, size_t wanted, size_t *output_length) {
    *output_length = 0;
    if (input_length < 2 || input[0] != 0x1f || input[1] != 0x8b) return 1;
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    if (inflateInit2(&stream, 16 + MAX_WBITS) != Z_OK) return 4;
    size_t chunk = input_length > (1u << 30) ? (1u << 30) : input_length;
    stream.next_in = (Bytef *)input;
    stream.avail_in = (uInt)chunk;
    stream.next_out = output;
    stream.avail_out = (uInt)wanted;
    int status = Z_OK;
    while (stream.avail_out > 0 && status == Z_OK) status = inflate(&stream, Z_NO_FLUSH);
    *output_length = wanted - stream.avail_out;
    inflateEnd(&stream);
    return (status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR) ? 0 : 2;
}
