// Open MPI defines its predefined handles (MPI_COMM_WORLD, MPI_DOUBLE, MPI_SUM, MPI_IN_PLACE, …)
// as macros that take the address of library globals; Swift cannot import those, so each one is
// exposed here as an inline function.
#ifndef SYNCBN_CMPI_SHIM_H
#define SYNCBN_CMPI_SHIM_H
#include <mpi.h>

static inline MPI_Comm syncbn_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Comm syncbn_mpi_comm_null(void) { return MPI_COMM_NULL; }
static inline MPI_Datatype syncbn_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype syncbn_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype syncbn_mpi_int64(void) { return MPI_INT64_T; }
static inline MPI_Datatype syncbn_mpi_int(void) { return MPI_INT; }
static inline MPI_Op syncbn_mpi_sum(void) { return MPI_SUM; }
static inline void *syncbn_mpi_in_place(void) { return MPI_IN_PLACE; }
static inline MPI_Errhandler syncbn_mpi_errors_return(void) { return MPI_ERRORS_RETURN; }
static inline MPI_Request syncbn_mpi_request_null(void) { return MPI_REQUEST_NULL; }
static inline MPI_Status *syncbn_mpi_status_ignore(void) { return MPI_STATUS_IGNORE; }
static inline MPI_Status *syncbn_mpi_statuses_ignore(void) { return MPI_STATUSES_IGNORE; }
static inline int syncbn_mpi_success(void) { return MPI_SUCCESS; }
static inline int syncbn_mpi_max_error_string(void) { return MPI_MAX_ERROR_STRING; }
static inline int syncbn_mpi_thread_funneled(void) { return MPI_THREAD_FUNNELED; }

#endif
