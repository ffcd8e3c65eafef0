// See include/dnnl_convolution.h.
#include "dnnl_convolution.h"

#include <dnnl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern void omp_set_num_threads(int);
extern int omp_get_max_threads(void);

/// Threads per oneDNN call: 1 (one per rank, like OpenBLAS) unless OMP_NUM_THREADS says otherwise
/// (0: leave OpenMP's own setting) or syncbn_dnnl_set_threads chose. Applied on whichever thread
/// creates or executes a primitive, since OpenMP keeps the setting per thread (in-process ranks
/// are threads) and a primitive keeps the thread count it was created with.
static int desired_threads = -1;

static void apply_threads(void) {
    if (desired_threads < 0) desired_threads = getenv("OMP_NUM_THREADS") ? 0 : 1;
    if (desired_threads > 0 && omp_get_max_threads() != desired_threads) omp_set_num_threads(desired_threads);
}

/// One engine for the process, created once (in-process ranks are threads that may ask for it at
/// the same moment: two engines would leave memory of one and primitives of the other). Each
/// thread executes on a stream of its own, since a oneDNN stream is not to be shared by threads.
static dnnl_engine_t shared_engine;
static int engine_status;
static pthread_once_t engine_once = PTHREAD_ONCE_INIT;
static pthread_key_t stream_key;   // this thread's stream, destroyed when the thread ends
static pthread_key_t workspace_key; // this thread's workspace (below), freed when the thread ends

static void destroy_stream(void *s) { dnnl_stream_destroy((dnnl_stream_t)s); }

/// The buffers oneDNN computes in where its layout is not the user's (an argument reordered in
/// or out) and the primitives' scratchpads: needed only during one call, so one set per thread
/// serves every primitive (by argument position, and the scratchpad), each as large as the
/// largest call so far. Kept per primitive they held three blocked copies of every weight tensor.
/// Slots CHUNK_SLOT… hold a chunk's activations reordered once for several calls
/// (syncbn_dnnl_convolution_block_chunk).
enum { WORKSPACE_SLOTS = 8, SCRATCHPAD_SLOT = 3, CHUNK_SLOT = 4, CHUNK_SLOTS = 4 };
typedef struct {
    void *buffer[WORKSPACE_SLOTS];
    size_t bytes[WORKSPACE_SLOTS];
} workspace;

static void destroy_workspace(void *p) {
    workspace *w = p;
    for (int i = 0; i < WORKSPACE_SLOTS; i++) free(w->buffer[i]);
    free(w);
}

static void create_engine(void) {
    if (pthread_key_create(&stream_key, destroy_stream) != 0 || pthread_key_create(&workspace_key, destroy_workspace) != 0 ||
        dnnl_engine_create(&shared_engine, dnnl_cpu, 0) != dnnl_success) {
        shared_engine = NULL;
        engine_status = 1;
    }
}

static int ensure_engine(char *error, size_t length) {
    pthread_once(&engine_once, create_engine);
    if (engine_status) snprintf(error, length, "oneDNN could not create a CPU engine");
    return engine_status;
}

/// This thread's stream (NULL if oneDNN cannot make one: the call then fails).
static dnnl_stream_t stream(void) {
    if (!shared_engine) return NULL;
    dnnl_stream_t s = (dnnl_stream_t)pthread_getspecific(stream_key);
    if (!s) {
        if (dnnl_stream_create(&s, shared_engine, dnnl_stream_default_flags) != dnnl_success) return NULL;
        pthread_setspecific(stream_key, s);
    }
    return s;
}

/// One argument of a primitive: the user's plain memory, and where oneDNN wants another layout,
/// its own buffer and the reorder between the two.
typedef struct {
    int arg;
    int is_output;
    dnnl_memory_t user;
    dnnl_memory_t internal; // NULL: the primitive reads or writes the user's memory
    dnnl_primitive_t reorder;
    size_t bytes;           // internal's size: its buffer is this thread's workspace slot
} argument;

typedef struct {
    dnnl_primitive_t primitive;
    argument args[3];
    int count;
    dnnl_memory_t scratchpad;  // buffer: the workspace's scratchpad slot
    size_t scratchpad_bytes;
    char implementation[64];
} operation;

struct syncbn_dnnl_convolution {
    operation forward, data, weights;
    int has_forward, has_weights;
    char implementations[200];
};

static int fail(char *error, size_t length, const char *what, dnnl_status_t status) {
    snprintf(error, length, "oneDNN: %s failed (status %d)", what, (int)status);
    return 1;
}

static void *aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

/// This thread's workspace buffer `slot`, of at least `bytes` (its contents undefined; NULL if
/// memory ran out).
static void *workspace_buffer(int slot, size_t bytes) {
    workspace *w = pthread_getspecific(workspace_key);
    if (!w) {
        if (!(w = calloc(1, sizeof *w))) return NULL;
        pthread_setspecific(workspace_key, w);
    }
    if (w->bytes[slot] < bytes) {
        free(w->buffer[slot]);
        w->bytes[slot] = 0;
        if (!(w->buffer[slot] = aligned(bytes))) return NULL;
        w->bytes[slot] = bytes;
    }
    return w->buffer[slot];
}

/// Sets up argument `index` of `op`: `user` is the plain descriptor, `chosen` the primitive's.
static int add_argument(operation *op, int arg, int is_output, const dnnl_memory_desc_t *user,
                        const dnnl_memory_desc_t *chosen, char *error, size_t length) {
    argument *a = &op->args[op->count++];
    memset(a, 0, sizeof *a);
    a->arg = arg;
    a->is_output = is_output;
    dnnl_status_t s = dnnl_memory_create(&a->user, user, shared_engine, DNNL_MEMORY_NONE);
    if (s != dnnl_success) return fail(error, length, "memory_create", s);
    if (dnnl_memory_desc_equal(user, chosen)) return 0;
    a->bytes = dnnl_memory_desc_get_size(chosen);
    s = dnnl_memory_create(&a->internal, chosen, shared_engine, DNNL_MEMORY_NONE);
    if (s != dnnl_success) return fail(error, length, "memory_create", s);
    dnnl_primitive_desc_t reorder_pd;
    s = is_output ? dnnl_reorder_primitive_desc_create(&reorder_pd, chosen, shared_engine, user, shared_engine, NULL)
                  : dnnl_reorder_primitive_desc_create(&reorder_pd, user, shared_engine, chosen, shared_engine, NULL);
    if (s != dnnl_success) return fail(error, length, "reorder_primitive_desc_create", s);
    s = dnnl_primitive_create(&a->reorder, reorder_pd);
    dnnl_primitive_desc_destroy(reorder_pd);
    if (s != dnnl_success) return fail(error, length, "reorder primitive_create", s);
    return 0;
}

static int finish_operation(operation *op, dnnl_primitive_desc_t pd, char *error, size_t length) {
    const char *impl = NULL;
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    snprintf(op->implementation, sizeof op->implementation, "%s", impl ? impl : "?");
    const dnnl_memory_desc_t *scratch = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t bytes = scratch ? dnnl_memory_desc_get_size(scratch) : 0;
    if (bytes > 0) {
        op->scratchpad_bytes = bytes;
        dnnl_status_t s = dnnl_memory_create(&op->scratchpad, scratch, shared_engine, DNNL_MEMORY_NONE);
        if (s != dnnl_success) return fail(error, length, "scratchpad memory_create", s);
    }
    dnnl_status_t s = dnnl_primitive_create(&op->primitive, pd);
    if (s != dnnl_success) return fail(error, length, "primitive_create", s);
    return 0;
}

static void destroy_operation(operation *op) {
    for (int i = 0; i < op->count; i++) {
        argument *a = &op->args[i];
        if (a->reorder) dnnl_primitive_destroy(a->reorder);
        if (a->internal) dnnl_memory_destroy(a->internal);
        if (a->user) dnnl_memory_destroy(a->user);
    }
    if (op->primitive) dnnl_primitive_destroy(op->primitive);
    if (op->scratchpad) dnnl_memory_destroy(op->scratchpad);
    memset(op, 0, sizeof *op);
}

/// Seconds spent by this thread in calls, and in their reorders between the plain and the blocked
/// layout (activations and weights apart): what keeping activations blocked could save at most.
static _Thread_local double seconds_total, seconds_activation_reorders, seconds_weight_reorders;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int run_reorder(argument *a, dnnl_memory_t from, dnnl_memory_t to) {
    double start = now();
    dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
    int failed = !stream() || dnnl_primitive_execute(a->reorder, stream(), 2, r) != dnnl_success;
    double elapsed = now() - start;
    if (a->arg == DNNL_ARG_WEIGHTS || a->arg == DNNL_ARG_DIFF_WEIGHTS) seconds_weight_reorders += elapsed;
    else seconds_activation_reorders += elapsed;
    return failed;
}

void syncbn_dnnl_timings(double *total, double *activation_reorders, double *weight_reorders) {
    *total = seconds_total;
    *activation_reorders = seconds_activation_reorders;
    *weight_reorders = seconds_weight_reorders;
}

/// Points `a`'s internal memory at `buffer`, or at this thread's workspace slot `slot` when
/// `buffer` is NULL (setting a handle also writes the zeros of a blocked layout's padding, which a
/// buffer shared with other primitives may not hold).
static int attach_internal(argument *a, int slot, void *buffer) {
    void *target = buffer ? buffer : workspace_buffer(slot, a->bytes);
    return !target || dnnl_memory_set_data_handle(a->internal, target) != dnnl_success;
}

/// Runs `op` on the user's buffers (in argument order): inputs reordered in, outputs out. With
/// `blocked_output`, an output oneDNN computes in another layout is written there as it is (its
/// reorder to the user's layout skipped). An input whose bit is set in `prepared` is already in the
/// primitive's layout (a slice of syncbn_dnnl_convolution_block_chunk's copy): read as it is.
static int execute_prepared(operation *op, void *const *handles, int prepared, void *blocked_output) {
    double start = now();
    int status = 1;
    apply_threads();
    dnnl_exec_arg_t args[4];
    int n = 0;
    for (int i = 0; i < op->count; i++) {
        argument *a = &op->args[i];
        if (a->internal && !a->is_output && (prepared & (1 << i))) {
            if (dnnl_memory_set_data_handle(a->internal, handles[i]) != dnnl_success) goto done;
        } else {
            if (dnnl_memory_set_data_handle(a->user, handles[i]) != dnnl_success) goto done;
            if (a->internal && attach_internal(a, i, a->is_output ? blocked_output : NULL)) goto done;
            if (a->internal && !a->is_output && run_reorder(a, a->user, a->internal)) goto done;
        }
        args[n].arg = a->arg;
        args[n].memory = a->internal ? a->internal : a->user;
        n++;
    }
    if (op->scratchpad) {
        void *buffer = workspace_buffer(SCRATCHPAD_SLOT, op->scratchpad_bytes);
        if (!buffer || dnnl_memory_set_data_handle(op->scratchpad, buffer) != dnnl_success) goto done;
        args[n].arg = DNNL_ARG_SCRATCHPAD;
        args[n].memory = op->scratchpad;
        n++;
    }
    if (!stream() || dnnl_primitive_execute(op->primitive, stream(), n, args) != dnnl_success) goto done;
    for (int i = 0; i < op->count; i++) {
        argument *a = &op->args[i];
        if (a->internal && a->is_output && !blocked_output && run_reorder(a, a->internal, a->user)) goto done;
    }
    status = dnnl_stream_wait(stream()) == dnnl_success ? 0 : 1;
done:
    seconds_total += now() - start;
    return status;
}

static int execute_into(operation *op, void *const *handles, void *blocked_output) {
    return execute_prepared(op, handles, 0, blocked_output);
}

static int execute(operation *op, void *const *handles) { return execute_into(op, handles, NULL); }

static void plain(dnnl_memory_desc_t *md, int n, int c, int h, int w, dnnl_format_tag_t tag) {
    dnnl_dims_t dims = {n, c, h, w};
    dnnl_memory_desc_init_by_tag(md, 4, dims, dnnl_f32, tag);
}

/// The source, weight and destination descriptors of n samples, activations in `act`, weights in `wt`.
static void descriptors(dnnl_memory_desc_t md[3], int n, int cin, int h, int w, int cout, int k, int oh, int ow,
                        dnnl_format_tag_t act, dnnl_format_tag_t wt) {
    plain(&md[0], n, cin, h, w, act);
    plain(&md[1], cout, cin, k, k, wt);
    plain(&md[2], n, cout, oh, ow, act);
}

/// One argument of an operation: its DNNL_ARG, direction, the user's descriptor and the query
/// for the primitive's own.
typedef struct {
    int arg, is_output;
    const dnnl_memory_desc_t *user;
    dnnl_query_t query;
} binding;

/// Sets up `op`'s three arguments from `pd` and creates its primitive.
static int bind(operation *op, dnnl_primitive_desc_t pd, const binding b[3], char *error, size_t length) {
    for (int i = 0; i < 3; i++) {
        if (add_argument(op, b[i].arg, b[i].is_output, b[i].user, dnnl_primitive_desc_query_md(pd, b[i].query, 0), error, length)) return 1;
    }
    return finish_operation(op, pd, error, length);
}

/// A forward-training primitive descriptor (also the hint backward needs).
static dnnl_status_t forward_pd(dnnl_primitive_desc_t *pd, dnnl_primitive_attr_t attr, const dnnl_memory_desc_t md[3],
                                const dnnl_dims_t strides, const dnnl_dims_t pad) {
    dnnl_convolution_desc_t desc;
    dnnl_status_t s = dnnl_convolution_forward_desc_init(&desc, dnnl_forward_training, dnnl_convolution_direct, &md[0], &md[1], NULL,
                                                        &md[2], strides, pad, pad);
    if (s != dnnl_success) return s;
    return dnnl_primitive_desc_create(pd, &desc, attr, shared_engine, NULL);
}

syncbn_dnnl_convolution *syncbn_dnnl_convolution_create(int n, int cin, int h, int w, int cout, int k, int stride, int padding,
                                                        int weights_minibatch, int weights_cout, int layout, char *error,
                                                        size_t length) {
    if (ensure_engine(error, length)) return NULL;
    // Before the descriptors: a primitive fixes its thread count when it is created (oneDNN
    // partitions the work then), so one created under OpenMP's default would run on every core.
    apply_threads();
    int oh = (h + 2 * padding - k) / stride + 1, ow = (w + 2 * padding - k) / stride + 1;
    syncbn_dnnl_convolution *c = calloc(1, sizeof *c);
    if (!c) { snprintf(error, length, "oneDNN: allocation failed"); return NULL; }
    dnnl_primitive_attr_t attr;
    dnnl_primitive_attr_create(&attr);
    dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    dnnl_primitive_desc_t fwd = NULL, bwd = NULL, hint = NULL;
    dnnl_status_t s;
    dnnl_dims_t strides = {stride, stride}, pad = {padding, padding};
    // The primitives' descriptors: plain, or `any` (oneDNN picks its blocked layout).
    dnnl_format_tag_t act = layout == SYNCBN_DNNL_PLAIN ? dnnl_nchw : dnnl_format_tag_any;
    dnnl_format_tag_t wt = layout == SYNCBN_DNNL_PLAIN ? dnnl_oihw : dnnl_format_tag_any;
    dnnl_convolution_desc_t desc;

    if (n > 0) {
        // Forward, and backward data hinted by it.
        dnnl_memory_desc_t user[3], md[3];
        descriptors(user, n, cin, h, w, cout, k, oh, ow, dnnl_nchw, dnnl_oihw);
        descriptors(md, n, cin, h, w, cout, k, oh, ow, act, wt);
        if ((s = forward_pd(&fwd, attr, md, strides, pad)) != dnnl_success) {
            fail(error, length, "convolution forward descriptor", s);
            goto failure;
        }
        const binding forward[3] = {{DNNL_ARG_SRC, 0, &user[0], dnnl_query_src_md}, {DNNL_ARG_WEIGHTS, 0, &user[1], dnnl_query_weights_md},
                                    {DNNL_ARG_DST, 1, &user[2], dnnl_query_dst_md}};
        if (bind(&c->forward, fwd, forward, error, length)) goto failure;
        if ((s = dnnl_convolution_backward_data_desc_init(&desc, dnnl_convolution_direct, &md[0], &md[1], &md[2], strides, pad, pad)) != dnnl_success ||
            (s = dnnl_primitive_desc_create(&bwd, &desc, attr, shared_engine, fwd)) != dnnl_success) {
            fail(error, length, "convolution backward-data descriptor", s);
            goto failure;
        }
        const binding data[3] = {{DNNL_ARG_DIFF_DST, 0, &user[2], dnnl_query_diff_dst_md}, {DNNL_ARG_WEIGHTS, 0, &user[1], dnnl_query_weights_md},
                                 {DNNL_ARG_DIFF_SRC, 1, &user[0], dnnl_query_diff_src_md}};
        if (bind(&c->data, bwd, data, error, length)) goto failure;
        dnnl_primitive_desc_destroy(bwd);
        bwd = NULL;
        c->has_forward = 1;
    }

    // Backward weights for weights_minibatch samples and weights_cout output channels.
    if (weights_minibatch > 0 && weights_cout > 0) {
        dnnl_memory_desc_t user[3], md[3];
        descriptors(user, weights_minibatch, cin, h, w, weights_cout, k, oh, ow, dnnl_nchw, dnnl_oihw);
        descriptors(md, weights_minibatch, cin, h, w, weights_cout, k, oh, ow, act, wt);
        if ((s = forward_pd(&hint, attr, md, strides, pad)) != dnnl_success) {
            fail(error, length, "convolution forward descriptor (weights hint)", s);
            goto failure;
        }
        if ((s = dnnl_convolution_backward_weights_desc_init(&desc, dnnl_convolution_direct, &md[0], &md[1], NULL, &md[2], strides, pad, pad)) != dnnl_success ||
            (s = dnnl_primitive_desc_create(&bwd, &desc, attr, shared_engine, hint)) != dnnl_success) {
            fail(error, length, "convolution backward-weights descriptor", s);
            goto failure;
        }
        const binding weights[3] = {{DNNL_ARG_SRC, 0, &user[0], dnnl_query_src_md}, {DNNL_ARG_DIFF_DST, 0, &user[2], dnnl_query_diff_dst_md},
                                    {DNNL_ARG_DIFF_WEIGHTS, 1, &user[1], dnnl_query_diff_weights_md}};
        if (bind(&c->weights, bwd, weights, error, length)) goto failure;
        c->has_weights = 1;
        dnnl_primitive_desc_destroy(bwd);
        bwd = NULL;
        dnnl_primitive_desc_destroy(hint);
        hint = NULL;
    }
    snprintf(c->implementations, sizeof c->implementations, "%s/%s/%s", c->has_forward ? c->forward.implementation : "-",
             c->has_forward ? c->data.implementation : "-", c->has_weights ? c->weights.implementation : "-");
    if (fwd) dnnl_primitive_desc_destroy(fwd);
    dnnl_primitive_attr_destroy(attr);
    return c;

failure:
    if (fwd) dnnl_primitive_desc_destroy(fwd);
    if (bwd) dnnl_primitive_desc_destroy(bwd);
    if (hint) dnnl_primitive_desc_destroy(hint);
    dnnl_primitive_attr_destroy(attr);
    syncbn_dnnl_convolution_destroy(c);
    return NULL;
}

void syncbn_dnnl_convolution_destroy(syncbn_dnnl_convolution *c) {
    if (!c) return;
    destroy_operation(&c->forward);
    destroy_operation(&c->data);
    destroy_operation(&c->weights);
    free(c);
}

int syncbn_dnnl_convolution_forward(syncbn_dnnl_convolution *c, const float *x, const float *w, float *y) {
    if (!c->has_forward) return 1;
    void *handles[3] = {(void *)x, (void *)w, y};
    return execute(&c->forward, handles);
}

int syncbn_dnnl_convolution_backward_data(syncbn_dnnl_convolution *c, const float *dy, const float *w, float *dx) {
    if (!c->has_forward) return 1;
    void *handles[3] = {(void *)dy, (void *)w, dx};
    return execute(&c->data, handles);
}

int syncbn_dnnl_convolution_backward_weights(syncbn_dnnl_convolution *c, const float *x, const float *dy, float *dw) {
    if (!c->has_weights) return 1;
    void *handles[3] = {(void *)x, (void *)dy, dw};
    return execute(&c->weights, handles);
}

size_t syncbn_dnnl_convolution_blocked_weights_gradient_floats(const syncbn_dnnl_convolution *c) {
    if (!c->has_weights || !c->weights.args[2].internal) return 0;
    const dnnl_memory_desc_t *md = NULL;
    if (dnnl_memory_get_memory_desc(c->weights.args[2].internal, &md) != dnnl_success || !md) return 0;
    return dnnl_memory_desc_get_size(md) / sizeof(float);
}

int syncbn_dnnl_convolution_backward_weights_blocked(syncbn_dnnl_convolution *c, const float *x, const float *dy, float *dw_blocked) {
    if (!c->has_weights || !c->weights.args[2].internal) return 1;
    void *handles[3] = {(void *)x, (void *)dy, NULL};
    return execute_into(&c->weights, handles, dw_blocked);
}

/// The argument a shared blocked copy is made with: a chunk primitive's forward source or
/// backward-data output gradient (the layout of dY, and of Y read as one); for a primitive with
/// backward weights alone, its source or output gradient.
static const argument *shared_argument(const syncbn_dnnl_convolution *c, int which) {
    if (which == SYNCBN_DNNL_FORWARD_WEIGHTS) return c->has_forward ? &c->forward.args[1] : NULL;
    if (which == SYNCBN_DNNL_DATA_WEIGHTS) return c->has_forward ? &c->data.args[1] : NULL;
    if (c->has_forward) return which == SYNCBN_DNNL_CHUNK_SOURCE ? &c->forward.args[0] : &c->data.args[0];
    if (c->has_weights) return which == SYNCBN_DNNL_CHUNK_SOURCE ? &c->weights.args[0] : &c->weights.args[1];
    return NULL;
}

/// The argument `reader` reads `which` with: its backward weights' source or output gradient, or
/// for a chunk primitive without backward weights, backward data's output gradient.
static const argument *reading_argument(const syncbn_dnnl_convolution *reader, int which) {
    if (reader->has_weights) return which == SYNCBN_DNNL_CHUNK_SOURCE ? &reader->weights.args[0] : &reader->weights.args[1];
    if (reader->has_forward && which == SYNCBN_DNNL_CHUNK_OUTPUT_GRADIENT) return &reader->data.args[0];
    return NULL;
}

float *syncbn_dnnl_convolution_block_chunk(syncbn_dnnl_convolution *c, int which, const float *plain, int buffer) {
    argument *a = (argument *)shared_argument(c, which);
    if (!a || !a->internal || buffer < 0 || buffer >= CHUNK_SLOTS) return NULL;
    double start = now();
    float *blocked = NULL;
    void *target = workspace_buffer(CHUNK_SLOT + buffer, a->bytes);
    if (target && dnnl_memory_set_data_handle(a->user, (void *)plain) == dnnl_success &&
        dnnl_memory_set_data_handle(a->internal, target) == dnnl_success && !run_reorder(a, a->user, a->internal) &&
        dnnl_stream_wait(stream()) == dnnl_success)
        blocked = target;
    seconds_total += now() - start;
    return blocked;
}

long syncbn_dnnl_convolution_chunk_slice_stride(const syncbn_dnnl_convolution *owner, const syncbn_dnnl_convolution *reader, int which) {
    const argument *a = shared_argument(owner, which), *b = reading_argument(reader, which);
    if (!a || !b || !a->internal || !b->internal) return 0;
    const dnnl_memory_desc_t *x = NULL, *y = NULL;
    if (dnnl_memory_get_memory_desc(a->internal, &x) != dnnl_success || dnnl_memory_get_memory_desc(b->internal, &y) != dnnl_success ||
        !x || !y)
        return 0;
    if (x->ndims != 4 || y->ndims != 4 || x->format_kind != dnnl_blocked || y->format_kind != dnnl_blocked ||
        x->data_type != dnnl_f32 || y->data_type != dnnl_f32 || x->offset0 != 0 || y->offset0 != 0 ||
        x->dims[0] % y->dims[0] != 0 || x->padded_dims[0] != x->dims[0] || y->padded_dims[0] != y->dims[0])
        return 0;
    const dnnl_blocking_desc_t *p = &x->format_desc.blocking, *q = &y->format_desc.blocking;
    for (int d = 0; d < 4; d++) {
        if (x->padded_offsets[d] != 0 || y->padded_offsets[d] != 0 || p->strides[d] != q->strides[d]) return 0;
        if (d > 0 && (x->dims[d] != y->dims[d] || x->padded_dims[d] != y->padded_dims[d])) return 0;
    }
    if (p->inner_nblks != q->inner_nblks) return 0;
    for (int i = 0; i < p->inner_nblks; i++) {
        if (p->inner_blks[i] != q->inner_blks[i] || p->inner_idxs[i] != q->inner_idxs[i] || p->inner_idxs[i] == 0) return 0;
    }
    // The samples outermost: the reader's samples are one stretch of the owner's copy.
    long stride = (long)p->strides[0];
    if ((size_t)stride * (size_t)y->dims[0] * sizeof(float) != dnnl_memory_desc_get_size(y)) return 0;
    if ((size_t)stride * (size_t)x->dims[0] * sizeof(float) != dnnl_memory_desc_get_size(x)) return 0;
    return stride;
}

int syncbn_dnnl_convolution_forward_prepared(syncbn_dnnl_convolution *c, const float *x, const float *w, int prepared, float *y) {
    if (!c->has_forward) return 1;
    void *handles[3] = {(void *)x, (void *)w, y};
    return execute_prepared(&c->forward, handles, prepared & 3, NULL);
}

int syncbn_dnnl_convolution_backward_data_prepared(syncbn_dnnl_convolution *c, const float *dy, const float *w, int prepared, float *dx) {
    if (!c->has_forward) return 1;
    void *handles[3] = {(void *)dy, (void *)w, dx};
    return execute_prepared(&c->data, handles, prepared & 3, NULL);
}

int syncbn_dnnl_convolution_backward_weights_prepared(syncbn_dnnl_convolution *c, const float *x, const float *dy, int prepared,
                                                      float *dw_blocked) {
    if (!c->has_weights || !c->weights.args[2].internal) return 1;
    void *handles[3] = {(void *)x, (void *)dy, NULL};
    return execute_prepared(&c->weights, handles, prepared & 3, dw_blocked);
}

int syncbn_dnnl_convolution_weights_gradient_to_plain(syncbn_dnnl_convolution *c, const float *blocked, float *dw) {
    argument *a = &c->weights.args[2];
    if (!c->has_weights || !a->internal) return 1;
    double start = now();
    int status = 1;
    if (!attach_internal(a, 2, (void *)blocked) && dnnl_memory_set_data_handle(a->user, dw) == dnnl_success &&
        !run_reorder(a, a->internal, a->user))
        status = dnnl_stream_wait(stream()) == dnnl_success ? 0 : 1;
    seconds_total += now() - start;
    return status;
}

int syncbn_dnnl_convolution_gather_weights_gradient(const syncbn_dnnl_convolution *c, const double *blocked, long start, long count,
                                                    double *plain) {
    const argument *a = &c->weights.args[2];
    if (!c->has_weights || !a->internal) return 1;
    const dnnl_memory_desc_t *md = NULL;
    if (dnnl_memory_get_memory_desc(a->internal, &md) != dnnl_success || !md || md->ndims != 4 || md->format_kind != dnnl_blocked) return 1;
    const dnnl_blocking_desc_t *b = &md->format_desc.blocking;
    long total = 1;
    for (int d = 0; d < 4; d++) total *= (long)md->dims[d];
    if (start < 0 || count < 0 || start + count > total) return 1;
    // oneDNN's offset of element (o, i, h, w) is a sum of one term per dimension (its outer block
    // times that block's stride, plus its places in the inner blocks): a table per dimension.
    long extent = 0;
    for (int d = 0; d < 4; d++) extent += (long)md->dims[d];
    long *table = malloc(sizeof(long) * (size_t)extent), *term[4];
    if (!table) return 1;
    for (int d = 0, at = 0; d < 4; at += (int)md->dims[d], d++) {
        term[d] = table + at;
        for (long x = 0; x < (long)md->dims[d]; x++) {
            long position = x + (long)md->padded_offsets[d], offset = 0, block_stride = 1;
            for (int k = b->inner_nblks - 1; k >= 0; k--) {
                if (b->inner_idxs[k] == d) {
                    offset += (position % (long)b->inner_blks[k]) * block_stride;
                    position /= (long)b->inner_blks[k];
                }
                block_stride *= (long)b->inner_blks[k];
            }
            term[d][x] = offset + position * (long)b->strides[d];
        }
    }
    const long I = (long)md->dims[1], H = (long)md->dims[2], W = (long)md->dims[3];
    long w = start % W, h = start / W % H, i = start / (W * H) % I, o = start / (W * H * I);
    const double *origin = blocked + md->offset0;
    for (long n = 0; n < count; n++) {
        plain[n] = origin[term[0][o] + term[1][i] + term[2][h] + term[3][w]];
        if (++w == W) {
            w = 0;
            if (++h == H) {
                h = 0;
                if (++i == I) { i = 0; o++; }
            }
        }
    }
    free(table);
    return 0;
}

const char *syncbn_dnnl_convolution_implementations(const syncbn_dnnl_convolution *c) { return c->implementations; }

const char *syncbn_dnnl_cpu_isa(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
    }
}

void syncbn_dnnl_set_threads(int threads) { desired_threads = threads > 0 ? threads : 1; }

int syncbn_dnnl_available(char *error, size_t length) { return ensure_engine(error, length); }
