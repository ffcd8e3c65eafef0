// A 2-D convolution through oneDNN (Debian's libdnnl-dev, C API of oneDNN 2.6) on Float data:
// the user's tensors are plain NCHW activations and OIHW weights; oneDNN may compute in its
// blocked layouts, with reorders at the primitive's edges. Primitives are created once per shape
// and reused; their scratchpad is owned here (user-managed scratchpad mode).
#ifndef SYNCBN_DNNL_CONVOLUTION_H
#define SYNCBN_DNNL_CONVOLUTION_H
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct syncbn_dnnl_convolution syncbn_dnnl_convolution;

/// Which layout oneDNN computes in: plain NCHW/OIHW throughout, or whatever its convolution
/// prefers (blocked, e.g. nChw8c/nChw16c), reordered from and to plain at the edges.
enum syncbn_dnnl_layout { SYNCBN_DNNL_PLAIN = 0, SYNCBN_DNNL_PREFERRED = 1 };

/// Forward and backward-data primitives for `minibatch` samples of cin×h×w into cout channels
/// (k×k kernel, stride, symmetric padding), and a backward-weights primitive for `weights_minibatch`
/// samples with `weights_cout` output channels (the layer's cout, or 2·cout + 1 for patch statistics;
/// 0: none); `minibatch` 0: backward weights only. NULL on failure, with a message in `error`.
syncbn_dnnl_convolution *syncbn_dnnl_convolution_create(int minibatch, int cin, int h, int w, int cout, int k,
                                                        int stride, int padding, int weights_minibatch, int weights_cout,
                                                        int layout, char *error, size_t error_length);
void syncbn_dnnl_convolution_destroy(syncbn_dnnl_convolution *convolution);

/// y (minibatch×cout×oh×ow) = conv(x, w). 0 on success.
int syncbn_dnnl_convolution_forward(syncbn_dnnl_convolution *convolution, const float *x, const float *w, float *y);
/// dx (minibatch×cin×h×w) = the input gradient of dy (minibatch×cout×oh×ow). 0 on success.
int syncbn_dnnl_convolution_backward_data(syncbn_dnnl_convolution *convolution, const float *dy, const float *w, float *dx);
/// dw (weights_cout×cin×k×k) = Σ over the weights_minibatch samples of dy ⋆ x. 0 on success.
int syncbn_dnnl_convolution_backward_weights(syncbn_dnnl_convolution *convolution, const float *x, const float *dy, float *dw);

/// Floats of the weight gradient in the layout oneDNN computes it in, when that is not the plain
/// one (0: it computes in the plain layout). A sum of such gradients reordered once equals the
/// sum of the reordered gradients bit for bit: a reorder only moves values.
size_t syncbn_dnnl_convolution_blocked_weights_gradient_floats(const syncbn_dnnl_convolution *convolution);
/// Backward weights into `dw_blocked` in oneDNN's own layout (no reorder).
int syncbn_dnnl_convolution_backward_weights_blocked(syncbn_dnnl_convolution *convolution, const float *x, const float *dy, float *dw_blocked);
/// Samples' activations reordered once into a blocked copy that several calls read: which
/// layout (a chunk primitive's forward source or backward-data output gradient — that of dY, and of
/// Y when it is read as one; for a primitive with backward weights alone, its source or output
/// gradient), and which of this thread's four chunk buffers (0–3) holds it until the next copy
/// into that buffer. NULL if that argument is not blocked, or on failure.
/// FORWARD_WEIGHTS and DATA_WEIGHTS: a chunk primitive's weights in the forward's and in backward
/// data's layout, reordered once for all the chunks of a batch.
enum syncbn_dnnl_chunk_argument {
    SYNCBN_DNNL_CHUNK_SOURCE = 0,
    SYNCBN_DNNL_CHUNK_OUTPUT_GRADIENT = 1,
    SYNCBN_DNNL_FORWARD_WEIGHTS = 2,
    SYNCBN_DNNL_DATA_WEIGHTS = 3
};
float *syncbn_dnnl_convolution_block_chunk(syncbn_dnnl_convolution *convolution, int which, const float *plain, int buffer);
/// Floats per sample of `owner`'s blocked copy of argument `which` when `reader` reads that
/// argument in the same layout (its backward weights' source or output gradient, or for a chunk
/// primitive without backward weights its backward data's output gradient), so that the reader's
/// samples are one stretch of the owner's copy; 0 if not.
long syncbn_dnnl_convolution_chunk_slice_stride(const syncbn_dnnl_convolution *owner, const syncbn_dnnl_convolution *reader, int which);
/// Forward and backward data with inputs already in the primitive's layout (a blocked copy made by
/// syncbn_dnnl_convolution_block_chunk): bit 0 of `prepared` says the first input (x; dy), bit 1
/// the weights.
int syncbn_dnnl_convolution_forward_prepared(syncbn_dnnl_convolution *convolution, const float *x, const float *w, int prepared, float *y);
int syncbn_dnnl_convolution_backward_data_prepared(syncbn_dnnl_convolution *convolution, const float *dy, const float *w, int prepared,
                                                   float *dx);
/// Backward weights into `dw_blocked` in oneDNN's layout; bit 0 of `prepared` says x, bit 1 dy is
/// already in the primitive's layout (a slice of a chunk's blocked copy), read without a reorder.
int syncbn_dnnl_convolution_backward_weights_prepared(syncbn_dnnl_convolution *convolution, const float *x, const float *dy, int prepared,
                                                      float *dw_blocked);
/// A weight gradient in oneDNN's layout reordered into the plain one.
int syncbn_dnnl_convolution_weights_gradient_to_plain(syncbn_dnnl_convolution *convolution, const float *blocked, float *dw);
/// Values start ..< start + count of the plain (cout×cin×k×k) order read from `blocked`, a Double
/// array in oneDNN's layout of the weight gradient, into `plain`: the reorder without a plain copy
/// of the whole. 1 if that layout is not a blocked one.
int syncbn_dnnl_convolution_gather_weights_gradient(const syncbn_dnnl_convolution *convolution, const double *blocked, long start,
                                                    long count, double *plain);

/// The implementations oneDNN chose ("jit:avx2", "gemm:jit", …), "forward/data/weights".
const char *syncbn_dnnl_convolution_implementations(const syncbn_dnnl_convolution *convolution);

/// The CPU instruction set oneDNN dispatches to ("avx2", "avx512_core", …).
const char *syncbn_dnnl_cpu_isa(void);
/// Threads oneDNN's OpenMP regions use (default: 1, or OMP_NUM_THREADS when set).
void syncbn_dnnl_set_threads(int threads);
/// Whether the library loads and can create a CPU engine; 0 if so, else a message in `error`.
int syncbn_dnnl_available(char *error, size_t error_length);

/// This thread's seconds in convolution calls since it started, and the part of them spent
/// reordering activations and weights between the plain and the blocked layout.
void syncbn_dnnl_timings(double *total, double *activation_reorders, double *weight_reorders);

#ifdef __cplusplus
}
#endif
#endif
