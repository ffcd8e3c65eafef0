// cblas.h from Debian's libopenblas-dev (found through pkg-config `openblas`).
#ifndef SYNCBN_COPENBLAS_SHIM_H
#define SYNCBN_COPENBLAS_SHIM_H
#include <cblas.h>
#endif
