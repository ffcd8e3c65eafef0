// CBN's window derivatives as oneDNN backward-weights work: for each ResNet-20 convolution,
// two backward-weights calls with C output channels (the weight gradient on dY, then Σ y·patch
// on Y) against one call with 2C output channels (a [dY, Y] output gradient), in oneDNN's own
// blocked layouts, minibatch = the weight-gradient leaf, best of 15 over a batch of 32.
//   gcc -O2 tools/bwd_weights_pair.c -o /tmp/bwd_weights_pair -ldnnl
//   OMP_NUM_THREADS=1 /tmp/bwd_weights_pair [leaf]
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static dnnl_engine_t eng; static dnnl_stream_t st;
typedef struct { dnnl_primitive_t p; dnnl_memory_t src, dd, dw, sp; } op;
static op make(int n,int cin,int h,int cout,int k,int s){
  int pad=k/2, oh=(h+2*pad-k)/s+1; op o;
  dnnl_memory_desc_t md[3]; dnnl_dims_t a={n,cin,h,h}, w={cout,cin,k,k}, d={n,cout,oh,oh};
  dnnl_memory_desc_init_by_tag(&md[0],4,a,dnnl_f32,dnnl_format_tag_any);
  dnnl_memory_desc_init_by_tag(&md[1],4,w,dnnl_f32,dnnl_format_tag_any);
  dnnl_memory_desc_init_by_tag(&md[2],4,d,dnnl_f32,dnnl_format_tag_any);
  dnnl_dims_t str={s,s}, pd={pad,pad};
  dnnl_primitive_attr_t attr; dnnl_primitive_attr_create(&attr); dnnl_primitive_attr_set_scratchpad_mode(attr,dnnl_scratchpad_mode_user);
  dnnl_convolution_desc_t fd, bd; dnnl_primitive_desc_t fpd, bpd;
  dnnl_convolution_forward_desc_init(&fd,dnnl_forward_training,dnnl_convolution_direct,&md[0],&md[1],NULL,&md[2],str,pd,pd);
  dnnl_primitive_desc_create(&fpd,&fd,attr,eng,NULL);
  dnnl_convolution_backward_weights_desc_init(&bd,dnnl_convolution_direct,&md[0],&md[1],NULL,&md[2],str,pd,pd);
  if (dnnl_primitive_desc_create(&bpd,&bd,attr,eng,fpd)!=dnnl_success){fprintf(stderr,"pd\n");exit(1);}
  dnnl_primitive_create(&o.p,bpd);
  const char*impl; dnnl_primitive_desc_query(bpd,dnnl_query_impl_info_str,0,&impl);
  dnnl_memory_create(&o.src,dnnl_primitive_desc_query_md(bpd,dnnl_query_src_md,0),eng,DNNL_MEMORY_ALLOCATE);
  dnnl_memory_create(&o.dd,dnnl_primitive_desc_query_md(bpd,dnnl_query_diff_dst_md,0),eng,DNNL_MEMORY_ALLOCATE);
  dnnl_memory_create(&o.dw,dnnl_primitive_desc_query_md(bpd,dnnl_query_diff_weights_md,0),eng,DNNL_MEMORY_ALLOCATE);
  dnnl_memory_create(&o.sp,dnnl_primitive_desc_query_md(bpd,dnnl_query_scratchpad_md,0),eng,DNNL_MEMORY_ALLOCATE);
  void*hd; dnnl_memory_get_data_handle(o.src,&hd); const dnnl_memory_desc_t*m=dnnl_primitive_desc_query_md(bpd,dnnl_query_src_md,0);
  size_t sz=dnnl_memory_desc_get_size(m); for(size_t i=0;i<sz/4;i++) ((float*)hd)[i]=(float)(i%7)*0.1f;
  dnnl_memory_get_data_handle(o.dd,&hd); m=dnnl_primitive_desc_query_md(bpd,dnnl_query_diff_dst_md,0);
  sz=dnnl_memory_desc_get_size(m); for(size_t i=0;i<sz/4;i++) ((float*)hd)[i]=(float)(i%5)*0.1f;
  return o;
}
static void run(op*o){ dnnl_exec_arg_t a[4]={{DNNL_ARG_SRC,o->src},{DNNL_ARG_DIFF_DST,o->dd},{DNNL_ARG_DIFF_WEIGHTS,o->dw},{DNNL_ARG_SCRATCHPAD,o->sp}};
  dnnl_primitive_execute(o->p,st,4,a); dnnl_stream_wait(st);}
int main(int argc,char**argv){
  dnnl_engine_create(&eng,dnnl_cpu,0); dnnl_stream_create(&st,eng,dnnl_stream_default_flags);
  int L[][5]={{1,16,28,3,1},{16,16,28,3,1},{16,32,28,3,2},{16,32,28,1,2},{32,32,14,3,1},{32,64,14,3,2},{32,64,14,1,2},{64,64,7,3,1}};
  int cnt[]={1,6,1,1,5,1,1,5}; int mb=argc>1?atoi(argv[1]):1; int reps=32/mb;
  double tot1=0,tot2=0;
  for(int l=0;l<8;l++){ int*x=L[l]; op a=make(mb,x[0],x[2],x[1],x[3],x[4]), b=make(mb,x[0],x[2],2*x[1],x[3],x[4]);
    double best1=1e9,best2=1e9;
    for(int r=0;r<15;r++){ double t=now(); for(int i=0;i<reps;i++){run(&a);run(&a);} t=now()-t; if(t<best1)best1=t;
      t=now(); for(int i=0;i<reps;i++) run(&b); t=now()-t; if(t<best2)best2=t; }
    printf("%d->%d %dx%d s%d @%d: two calls of C %.3f ms, one call of 2C %.3f ms (%.2f)\n",x[0],x[1],x[3],x[3],x[4],x[2],best1*1e3,best2*1e3,best2/best1);
    tot1+=cnt[l]*best1; tot2+=cnt[l]*best2; }
  printf("per step (x counts, batch 32 in leaves of %d): two calls %.1f ms, one call of 2C %.1f ms\n",mb,tot1*1e3,tot2*1e3);
}
