// One convolution layer's backward-weights time in oneDNN for L samples three ways: L calls of
// one sample each (syncbn's per-sample leaves), one call with the samples as L groups (each
// sample's gradient kept apart), and one call over L samples (summed inside oneDNN, as PyTorch
// runs it). Blocked layouts, no reorders, one thread; three rounds, each printed.
// With --pair, CBN's window derivatives as backward-weights work instead: for each ResNet-20
// convolution at batch 32 in leaves of L samples, two calls of C_out output channels (the weight
// gradient on dY, then Σ y·patch on Y) against one call of 2·C_out (a [dY, Y] output gradient),
// best of 15, and the sums over a step (each layer times its count in the network).
//   cc -O2 tools/onednn_leaves.c -o /tmp/onednn_leaves -ldnnl
//   OMP_NUM_THREADS=1 /tmp/onednn_leaves C_IN C_OUT H    (3x3, stride 1, padding 1, L = 8)
//   OMP_NUM_THREADS=1 /tmp/onednn_leaves --pair [L]      (L divides 32; default 1)
#include <dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define CHECK(x) do { dnnl_status_t s_ = (x); if (s_ != dnnl_success) { printf("fail %s: %d\n", #x, s_); exit(1);} } while (0)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
dnnl_engine_t eng; dnnl_stream_t st;
// G groups of cin -> cout channels (G = 1: a plain convolution), minibatch mb; oneDNN picks the layouts.
typedef struct { dnnl_primitive_t p; dnnl_memory_t src, dd, dw; } bw;
static bw make(int G, int mb, int cin, int cout, int h, int k, int stride) {
    bw r;
    int oh = (h + 2 * (k / 2) - k) / stride + 1;
    dnnl_dims_t src = {mb, G * cin, h, h}, dst = {mb, G * cout, oh, oh};
    dnnl_memory_desc_t s_md, d_md, w_md;
    CHECK(dnnl_memory_desc_init_by_tag(&s_md, 4, src, dnnl_f32, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&d_md, 4, dst, dnnl_f32, dnnl_format_tag_any));
    if (G > 1) { dnnl_dims_t w = {G, cout, cin, k, k}; CHECK(dnnl_memory_desc_init_by_tag(&w_md, 5, w, dnnl_f32, dnnl_format_tag_any)); }
    else { dnnl_dims_t w = {cout, cin, k, k}; CHECK(dnnl_memory_desc_init_by_tag(&w_md, 4, w, dnnl_f32, dnnl_format_tag_any)); }
    dnnl_dims_t strides = {stride, stride}, pad = {k / 2, k / 2};
    dnnl_convolution_desc_t fd, bd;
    CHECK(dnnl_convolution_forward_desc_init(&fd, dnnl_forward_training, dnnl_convolution_direct, &s_md, &w_md, NULL, &d_md, strides, pad, pad));
    dnnl_primitive_desc_t fpd, bpd;
    CHECK(dnnl_primitive_desc_create(&fpd, &fd, NULL, eng, NULL));
    CHECK(dnnl_convolution_backward_weights_desc_init(&bd, dnnl_convolution_direct, &s_md, &w_md, NULL, &d_md, strides, pad, pad));
    CHECK(dnnl_primitive_desc_create(&bpd, &bd, NULL, eng, fpd));
    const char *impl; dnnl_primitive_desc_query(bpd, dnnl_query_impl_info_str, 0, &impl); printf("G=%d mb=%d impl %s\n", G, mb, impl);
    CHECK(dnnl_primitive_create(&r.p, bpd));
    CHECK(dnnl_memory_create(&r.src, dnnl_primitive_desc_query_md(bpd, dnnl_query_src_md, 0), eng, DNNL_MEMORY_ALLOCATE));
    CHECK(dnnl_memory_create(&r.dd, dnnl_primitive_desc_query_md(bpd, dnnl_query_diff_dst_md, 0), eng, DNNL_MEMORY_ALLOCATE));
    CHECK(dnnl_memory_create(&r.dw, dnnl_primitive_desc_query_md(bpd, dnnl_query_diff_weights_md, 0), eng, DNNL_MEMORY_ALLOCATE));
    float *p; size_t n;
    dnnl_memory_get_data_handle(r.src, (void **)&p); n = dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(bpd, dnnl_query_src_md, 0)) / 4; for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    dnnl_memory_get_data_handle(r.dd, (void **)&p); n = dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(bpd, dnnl_query_diff_dst_md, 0)) / 4; for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    return r;
}
static double run(bw *b, int reps) {
    dnnl_exec_arg_t a[3] = {{DNNL_ARG_SRC, b->src}, {DNNL_ARG_DIFF_DST, b->dd}, {DNNL_ARG_DIFF_WEIGHTS, b->dw}};
    for (int i = 0; i < 5; i++) dnnl_primitive_execute(b->p, st, 3, a);
    double t = now();
    for (int i = 0; i < reps; i++) dnnl_primitive_execute(b->p, st, 3, a);
    dnnl_stream_wait(st);
    return (now() - t) / reps;
}
// --pair: the two calls CBN's backward makes per leaf against one call of twice the channels.
static int pair(int leaf) {
    // (C_in, C_out, H, kernel, stride, count in ResNet-20), as tools/conv_layers.py.
    static const int layers[8][6] = {{1, 16, 28, 3, 1, 1}, {16, 16, 28, 3, 1, 6}, {16, 32, 28, 3, 2, 1}, {16, 32, 28, 1, 2, 1},
                                     {32, 32, 14, 3, 1, 5}, {32, 64, 14, 3, 2, 1}, {32, 64, 14, 1, 2, 1}, {64, 64, 7, 3, 1, 5}};
    int leaves = 32 / leaf;
    double two_total = 0, fused_total = 0;
    for (int l = 0; l < 8; l++) {
        const int *x = layers[l];
        bw single = make(1, leaf, x[0], x[1], x[2], x[3], x[4]), fused = make(1, leaf, x[0], 2 * x[1], x[2], x[3], x[4]);
        double two = 1e9, one = 1e9;
        for (int r = 0; r < 15; r++) {
            double t = run(&single, 2 * leaves) * 2 * leaves, u = run(&fused, leaves) * leaves;
            if (t < two) two = t;
            if (u < one) one = u;
        }
        printf("%d->%d %dx%d s%d @%d: two calls of C %.3f ms, one call of 2C %.3f ms\n", x[0], x[1], x[3], x[3], x[4], x[2], two * 1e3, one * 1e3);
        two_total += x[5] * two;
        fused_total += x[5] * one;
    }
    printf("per step (batch 32 in leaves of %d): two calls %.1f ms, one call of 2C %.1f ms\n", leaf, two_total * 1e3, fused_total * 1e3);
    return 0;
}
int main(int argc, char **argv) {
    int leaf = argc == 3 ? atoi(argv[2]) : 1;
    int is_pair = argc >= 2 && argc <= 3 && strcmp(argv[1], "--pair") == 0;
    if (is_pair ? (leaf < 1 || 32 % leaf != 0) : argc != 4) {
        fprintf(stderr, "usage: onednn_leaves C_IN C_OUT H, or onednn_leaves --pair [L] with L dividing 32\n");
        return 2;
    }
    CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
    CHECK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
    if (is_pair) return pair(leaf);
    int cin = atoi(argv[1]), cout = atoi(argv[2]), h = atoi(argv[3]), G = 8;
    bw one = make(1, 1, cin, cout, h, 3, 1), grouped = make(G, 1, cin, cout, h, 3, 1), batch = make(1, G, cin, cout, h, 3, 1);
    for (int r = 0; r < 3; r++) {
        double a = run(&one, 400) * G, b = run(&grouped, 50), c = run(&batch, 50);
        printf("%dx%d@%d: %d mb1 calls %.3f ms, one grouped call (g=%d) %.3f ms, one mb%d call (summed over samples) %.3f ms\n", cin, cout, h, G, a * 1e3, G, b * 1e3, G, c * 1e3);
    }
}
