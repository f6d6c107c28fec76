/* An emulated libnccl.so.2 for machines without GPUs (CI, this repository's tests).
 *
 * It exports NCCL's C ABI (nccl.h 2.x: the same symbol names, argument types, enum values and
 * ncclResult_t codes) and runs the collectives between the processes of one machine over
 * loopback TCP, on host memory: on the CPU path, and under the CUDA driver emulation
 * (kernels/host_emulation.h), "device" pointers are host pointers.
 *
 * Streams: with no stream (NULL, the CPU path) a collective runs at once, synchronously. With a
 * CUDA stream, it is enqueued there as NCCL does on a GPU: through the driver's cuLaunchHostFunc
 * (found in the libcuda already loaded, the driver emulation under the tests), so it runs in
 * stream order, when the emulated driver runs that stream's work (an event on it waited for or
 * queried, a stream or context synchronisation). A program that reads a reduced buffer without
 * waiting for the stream reads the values from before the collective, as it could on a GPU. A
 * failure there becomes the communicator's async error (ncclCommGetAsyncError), as with NCCL.
 * Without a loaded libcuda exporting cuLaunchHostFunc, collectives on a stream run at once.
 *
 * Topology: a star. ncclGetUniqueId opens a listening socket on 127.0.0.1 and writes its port and
 * a random token into the id; the process that made the id must be rank 0 (the hub: the trainer's
 * rank 0 makes the id and hands it out, as with NCCL). Every other rank connects to the hub. A
 * collective sends each rank's header (operation, count, type, op, root) and data to the hub,
 * which checks that the headers agree, computes the result and sends it back. Reductions run in
 * rank order (rank 0 + rank 1 + ... element by element), so results are reproducible and equal a
 * sequential sum in that order.
 *
 * Failure: every socket operation waits at most FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS (default 600000)
 * milliseconds. A peer that exits closes its socket: the hub sees it at once, fails the
 * collective with ncclRemoteError and closes every connection, so the other ranks fail too
 * instead of waiting. A failed communicator keeps its error (ncclCommGetAsyncError) and refuses
 * further collectives; ncclCommAbort and ncclCommDestroy release it.
 *
 * Build: cc -O2 -shared -fPIC -o libnccl.so.2 nccl_emulation.c -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---- nccl.h's types and values ---- */
#define NCCL_UNIQUE_ID_BYTES 128
typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclNumResults = 8
} ncclResult_t;
typedef enum {
  ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4, ncclUint64 = 5,
  ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9
} ncclDataType_t;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
typedef void *cudaStream_t;
typedef struct ncclComm *ncclComm_t;

/* NCCL_VERSION_CODE of the NCCL whose ABI this follows: 2.21.5. */
#define EMU_VERSION 22105

/* Marks the library as the emulation (the trainer refuses host memory with real NCCL). */
int flux_kernels_nccl_emulation = 1;

/* ---- the communicator ---- */
struct ncclComm {
  int rank, nranks;
  /* Hub (rank 0): fds[r] is rank r's connection (fds[0] unused). Others: fds[0] is the hub. */
  int *fds;
  ncclResult_t async_error;
  int timeout_ms;
};

enum { OP_ALLREDUCE = 1, OP_BROADCAST = 2, OP_ALLGATHER = 3 };
struct header {
  int32_t op, type, redop, root;
  uint64_t count;
};
#define MAGIC 0x464b4e43434c3031ULL /* "FKNCCL01" */
struct id_body {
  uint64_t magic, token;
  uint16_t port;
};
struct hello {
  uint64_t magic, token;
  int32_t rank, nranks;
};

static __thread char last_error[512];
static pthread_mutex_t ids_lock = PTHREAD_MUTEX_INITIALIZER;
/* Listening sockets of the ids this process made, by token (a process makes a handful). */
#define MAX_IDS 64
static struct { uint64_t token; int fd; } ids[MAX_IDS];
static int n_ids;

static ncclResult_t fail(ncclResult_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static ncclResult_t fail(ncclResult_t code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return code;
}

static int timeout_ms(void) {
  const char *s = getenv("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS");
  long v = s ? strtol(s, NULL, 10) : 0;
  return v > 0 ? (int)v : 600000;
}

static long long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Waits for `events` on fd until `deadline` (ms); 0 ready, else an error was recorded. */
static ncclResult_t wait_fd(int fd, short events, long long deadline, int peer, const char *what) {
  for (;;) {
    long long left = deadline - now_ms();
    if (left <= 0)
      return fail(ncclRemoteError, "emulated NCCL: %s rank %d timed out (FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS)", what, peer);
    struct pollfd p = {fd, events, 0};
    int r = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
    if (r > 0) return ncclSuccess;
    if (r < 0 && errno != EINTR) return fail(ncclSystemError, "emulated NCCL: poll: %s", strerror(errno));
  }
}

static ncclResult_t send_all(int fd, const void *buf, size_t n, int tmo, int peer) {
  const char *p = buf;
  long long deadline = now_ms() + tmo;
  while (n > 0) {
    ncclResult_t r = wait_fd(fd, POLLOUT, deadline, peer, "sending to");
    if (r != ncclSuccess) return r;
    /* MSG_NOSIGNAL: a closed peer is an error code, not SIGPIPE killing this process. */
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(ncclRemoteError, "emulated NCCL: rank %d is gone (send: %s)", peer, strerror(errno));
    }
    p += k;
    n -= (size_t)k;
  }
  return ncclSuccess;
}

static ncclResult_t recv_all(int fd, void *buf, size_t n, int tmo, int peer) {
  char *p = buf;
  long long deadline = now_ms() + tmo;
  while (n > 0) {
    ncclResult_t r = wait_fd(fd, POLLIN, deadline, peer, "waiting for");
    if (r != ncclSuccess) return r;
    ssize_t k = recv(fd, p, n, 0);
    if (k == 0) return fail(ncclRemoteError, "emulated NCCL: rank %d closed its connection (exited or aborted)", peer);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(ncclRemoteError, "emulated NCCL: rank %d is gone (recv: %s)", peer, strerror(errno));
    }
    p += k;
    n -= (size_t)k;
  }
  return ncclSuccess;
}

static void close_all(struct ncclComm *c) {
  if (!c->fds) return;
  int n = c->rank == 0 ? c->nranks : 1;
  for (int i = 0; i < n; i++)
    if (c->fds[i] >= 0) {
      close(c->fds[i]);
      c->fds[i] = -1;
    }
}

/* A failed collective: the error kept, every connection closed so the peers fail too. */
static ncclResult_t broken(struct ncclComm *c, ncclResult_t r) {
  c->async_error = r;
  close_all(c);
  return r;
}

static size_t type_size(int t) {
  switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

#define REDUCE(T)                                                         \
  {                                                                       \
    T *a = acc;                                                           \
    const T *b = in;                                                      \
    for (size_t i = 0; i < n; i++) switch (op) {                          \
        case ncclSum: case ncclAvg: a[i] = a[i] + b[i]; break;            \
        case ncclProd: a[i] = a[i] * b[i]; break;                         \
        case ncclMax: a[i] = a[i] > b[i] ? a[i] : b[i]; break;            \
        default: a[i] = a[i] < b[i] ? a[i] : b[i]; break;                 \
      }                                                                   \
  }                                                                       \
  break;

/* acc ← acc (op) in, element by element. */
static void reduce_into(void *acc, const void *in, size_t n, int type, int op) {
  switch (type) {
    case ncclInt8: REDUCE(int8_t)
    case ncclUint8: REDUCE(uint8_t)
    case ncclInt32: REDUCE(int32_t)
    case ncclUint32: REDUCE(uint32_t)
    case ncclInt64: REDUCE(int64_t)
    case ncclUint64: REDUCE(uint64_t)
    case ncclFloat32: REDUCE(float)
    case ncclFloat64: REDUCE(double)
  }
}

static void divide(void *acc, size_t n, int type, int by) {
  for (size_t i = 0; i < n; i++) switch (type) {
      case ncclFloat32: ((float *)acc)[i] /= (float)by; break;
      case ncclFloat64: ((double *)acc)[i] /= (double)by; break;
      case ncclInt32: ((int32_t *)acc)[i] /= by; break;
      case ncclUint32: ((uint32_t *)acc)[i] /= (uint32_t)by; break;
      case ncclInt64: ((int64_t *)acc)[i] /= by; break;
      case ncclUint64: ((uint64_t *)acc)[i] /= (uint64_t)by; break;
      case ncclInt8: ((int8_t *)acc)[i] /= by; break;
      case ncclUint8: ((uint8_t *)acc)[i] /= (uint8_t)by; break;
    }
}

/* ---- the API ---- */
ncclResult_t ncclGetVersion(int *version) {
  if (!version) return fail(ncclInvalidArgument, "ncclGetVersion: version is NULL");
  *version = EMU_VERSION;
  return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char *ncclGetLastError(ncclComm_t comm) {
  (void)comm;
  return last_error;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
  if (!id) return fail(ncclInvalidArgument, "ncclGetUniqueId: id is NULL");
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(ncclSystemError, "emulated NCCL: socket: %s", strerror(errno));
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 256) != 0 ||
      getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
    close(fd);
    return fail(ncclSystemError, "emulated NCCL: cannot listen on 127.0.0.1: %s", strerror(errno));
  }
  struct id_body b = {MAGIC, 0, ntohs(a.sin_port)};
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  b.token = ((uint64_t)getpid() << 32) ^ (uint64_t)t.tv_nsec ^ ((uint64_t)t.tv_sec << 20) ^ (uint64_t)b.port;
  pthread_mutex_lock(&ids_lock);
  if (n_ids == MAX_IDS) {
    pthread_mutex_unlock(&ids_lock);
    close(fd);
    return fail(ncclSystemError, "emulated NCCL: more than %d unique ids in one process", MAX_IDS);
  }
  ids[n_ids].token = b.token;
  ids[n_ids].fd = fd;
  n_ids++;
  pthread_mutex_unlock(&ids_lock);
  memset(id, 0, sizeof *id);
  memcpy(id->internal, &b, sizeof b);
  return ncclSuccess;
}

/* The listening socket of `token`, taken out of the table (an id starts one communicator). */
static int take_listener(uint64_t token) {
  int fd = -1;
  pthread_mutex_lock(&ids_lock);
  for (int i = 0; i < n_ids; i++)
    if (ids[i].token == token) {
      fd = ids[i].fd;
      ids[i] = ids[--n_ids];
      break;
    }
  pthread_mutex_unlock(&ids_lock);
  return fd;
}

static ncclResult_t init_hub(struct ncclComm *c, const struct id_body *b) {
  int lfd = take_listener(b->token);
  if (lfd < 0)
    return fail(ncclInvalidUsage,
                "emulated NCCL: rank 0 must be the process that called ncclGetUniqueId for this id (it is the hub), "
                "and an id starts one communicator");
  long long deadline = now_ms() + c->timeout_ms;
  int joined = 1;
  ncclResult_t r = ncclSuccess;
  while (joined < c->nranks) {
    r = wait_fd(lfd, POLLIN, deadline, -1, "ncclCommInitRank: waiting for the ranks to join,");
    if (r != ncclSuccess) {
      fail(r, "emulated NCCL: ncclCommInitRank: %d of %d ranks joined before the timeout", joined, c->nranks);
      break;
    }
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      r = fail(ncclSystemError, "emulated NCCL: accept: %s", strerror(errno));
      break;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct hello h;
    r = recv_all(fd, &h, sizeof h, c->timeout_ms, -1);
    if (r != ncclSuccess) {
      close(fd);
      break;
    }
    if (h.magic != MAGIC || h.token != b->token) {
      close(fd); /* not ours: a stray connection */
      continue;
    }
    if (h.nranks != c->nranks || h.rank <= 0 || h.rank >= c->nranks || c->fds[h.rank] >= 0) {
      close(fd);
      r = fail(ncclInvalidUsage, "emulated NCCL: a rank joined as %d of %d, rank 0 expects ranks 1..%d of %d once each",
               h.rank, h.nranks, c->nranks - 1, c->nranks);
      break;
    }
    c->fds[h.rank] = fd;
    joined++;
  }
  close(lfd);
  if (r != ncclSuccess) return r;
  int32_t ok = 1;
  for (int i = 1; i < c->nranks; i++)
    if ((r = send_all(c->fds[i], &ok, sizeof ok, c->timeout_ms, i)) != ncclSuccess) return r;
  return ncclSuccess;
}

static ncclResult_t init_peer(struct ncclComm *c, const struct id_body *b) {
  long long deadline = now_ms() + c->timeout_ms;
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(b->port);
  int fd = -1;
  for (;;) {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail(ncclSystemError, "emulated NCCL: socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) break;
    int e = errno;
    close(fd);
    if (now_ms() >= deadline)
      return fail(ncclRemoteError, "emulated NCCL: cannot reach rank 0 at 127.0.0.1:%u (%s)", b->port, strerror(e));
    usleep(20000);
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->fds[0] = fd;
  struct hello h = {MAGIC, b->token, c->rank, c->nranks};
  ncclResult_t r = send_all(fd, &h, sizeof h, c->timeout_ms, 0);
  int32_t ok = 0;
  if (r == ncclSuccess) r = recv_all(fd, &ok, sizeof ok, c->timeout_ms, 0);
  return r;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
  if (nranks < 1) return fail(ncclInvalidArgument, "ncclCommInitRank: nranks %d < 1", nranks);
  if (rank < 0 || rank >= nranks)
    return fail(ncclInvalidArgument, "ncclCommInitRank: rank %d is not in 0..%d", rank, nranks - 1);
  struct id_body b;
  memcpy(&b, id.internal, sizeof b);
  if (b.magic != MAGIC) return fail(ncclInvalidArgument, "ncclCommInitRank: the unique id is not one of ncclGetUniqueId's");
  struct ncclComm *c = calloc(1, sizeof *c);
  int *fds = malloc(sizeof(int) * (size_t)nranks);
  if (!c || !fds) {
    free(c);
    free(fds);
    return fail(ncclSystemError, "emulated NCCL: out of memory");
  }
  for (int i = 0; i < nranks; i++) fds[i] = -1;
  c->rank = rank;
  c->nranks = nranks;
  c->fds = fds;
  c->timeout_ms = timeout_ms();
  ncclResult_t r = nranks == 1 ? ncclSuccess : rank == 0 ? init_hub(c, &b) : init_peer(c, &b);
  if (r != ncclSuccess) {
    close_all(c);
    free(c->fds);
    free(c);
    return r;
  }
  *comm = c;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommDestroy: comm is NULL");
  close_all(comm);
  free(comm->fds);
  free(comm);
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *err) {
  if (!comm || !err) return fail(ncclInvalidArgument, "ncclCommGetAsyncError: NULL argument");
  *err = comm->async_error;
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
  if (!comm || !count) return fail(ncclInvalidArgument, "ncclCommCount: NULL argument");
  *count = comm->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
  if (!comm || !rank) return fail(ncclInvalidArgument, "ncclCommUserRank: NULL argument");
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart(void) { return ncclSuccess; }
ncclResult_t ncclGroupEnd(void) { return ncclSuccess; }

/* One collective. `in` is this rank's contribution (`in_n` bytes; NULL for a broadcast's
 * non-root), `out` receives `out_n` bytes. */
static ncclResult_t collective(struct ncclComm *c, struct header h, const void *in, size_t in_n, void *out,
                               size_t out_n) {
  if (c->async_error != ncclSuccess)
    return fail(c->async_error, "emulated NCCL: the communicator failed before (%s); abort it",
                ncclGetErrorString(c->async_error));
  size_t es = type_size(h.type);
  size_t n = h.count;
  int tmo = c->timeout_ms;
  ncclResult_t r;
  if (c->nranks == 1) {
    if (out != in && in) memmove(out, in, out_n < in_n ? out_n : in_n);
    return ncclSuccess;
  }
  if (c->rank != 0) {
    int hub = c->fds[0];
    if ((r = send_all(hub, &h, sizeof h, tmo, 0)) != ncclSuccess) return broken(c, r);
    if (in_n && (r = send_all(hub, in, in_n, tmo, 0)) != ncclSuccess) return broken(c, r);
    int32_t status = 0;
    if ((r = recv_all(hub, &status, sizeof status, tmo, 0)) != ncclSuccess) return broken(c, r);
    if (status != ncclSuccess)
      return broken(c, fail((ncclResult_t)status, "emulated NCCL: rank 0 refused the collective: the ranks called "
                                                  "different collectives or counts"));
    if ((r = recv_all(hub, out, out_n, tmo, 0)) != ncclSuccess) return broken(c, r);
    return ncclSuccess;
  }
  /* The hub: headers and data in rank order. */
  char *res = malloc(out_n ? out_n : 1);
  char *tmp = malloc(n * es > 0 ? n * es : 1);
  if (!res || !tmp) {
    free(res);
    free(tmp);
    return broken(c, fail(ncclSystemError, "emulated NCCL: out of memory"));
  }
  if (h.op == OP_ALLREDUCE) memcpy(res, in, n * es);
  if (h.op == OP_ALLGATHER) memcpy(res, in, n * es);
  if (h.op == OP_BROADCAST && h.root == 0) memcpy(res, in, n * es);
  int mismatch = 0;
  r = ncclSuccess;
  for (int i = 1; i < c->nranks && r == ncclSuccess; i++) {
    struct header p;
    if ((r = recv_all(c->fds[i], &p, sizeof p, tmo, i)) != ncclSuccess) break;
    int same = p.op == h.op && p.type == h.type && p.count == h.count && p.redop == h.redop && p.root == h.root;
    if (!same) {
      mismatch = i;
      r = fail(ncclInvalidUsage,
               "emulated NCCL: rank %d called collective %d (%llu values of type %d) while rank 0 called %d (%llu of "
               "type %d)",
               i, p.op, (unsigned long long)p.count, p.type, h.op, (unsigned long long)h.count, h.type);
      break;
    }
    int sends = p.op != OP_BROADCAST || p.root == i;
    if (!sends) continue;
    char *dst = h.op == OP_ALLGATHER ? res + (size_t)i * n * es : h.op == OP_BROADCAST ? res : tmp;
    if ((r = recv_all(c->fds[i], dst, n * es, tmo, i)) != ncclSuccess) break;
    if (h.op == OP_ALLREDUCE) reduce_into(res, tmp, n, h.type, h.redop);
  }
  if (r == ncclSuccess && h.op == OP_ALLREDUCE && h.redop == ncclAvg) divide(res, n, h.type, c->nranks);
  if (r != ncclSuccess) {
    if (mismatch) {
      int32_t status = ncclInvalidUsage;
      for (int i = 1; i < c->nranks; i++) send_all(c->fds[i], &status, sizeof status, tmo, i);
    }
    free(res);
    free(tmp);
    return broken(c, r);
  }
  int32_t ok = ncclSuccess;
  for (int i = 1; i < c->nranks && r == ncclSuccess; i++) {
    if ((r = send_all(c->fds[i], &ok, sizeof ok, tmo, i)) != ncclSuccess) break;
    r = send_all(c->fds[i], res, out_n, tmo, i);
  }
  if (r == ncclSuccess) memcpy(out, res, out_n);
  free(res);
  free(tmp);
  return r == ncclSuccess ? ncclSuccess : broken(c, r);
}

/* A collective enqueued on a CUDA stream (see the note at the top). */
struct queued {
  struct ncclComm *comm;
  struct header h;
  const void *in;
  size_t in_n;
  void *out;
  size_t out_n;
};

static void run_queued(void *arg) {
  struct queued *q = arg;
  /* A failure marks the communicator (broken() or an earlier failure): its async error says so. */
  ncclResult_t r = collective(q->comm, q->h, q->in, q->in_n, q->out, q->out_n);
  if (r != ncclSuccess && q->comm->async_error == ncclSuccess) q->comm->async_error = r;
  free(q);
}

typedef int (*launch_host_func_t)(void *stream, void (*fn)(void *), void *arg);

/* The loaded CUDA driver's cuLaunchHostFunc, or NULL (no libcuda in the process). */
static launch_host_func_t launch_host_func(void) {
  static launch_host_func_t f;
  static int looked;
  if (!looked) {
    const char *names[] = {"libcuda.so.1", "libcuda.so"};
    for (int i = 0; i < 2 && !f; i++) {
      void *lib = dlopen(names[i], RTLD_LAZY | RTLD_NOLOAD);
      if (lib) f = (launch_host_func_t)dlsym(lib, "cuLaunchHostFunc");
    }
    looked = 1;
  }
  return f;
}

/* Runs the collective now (no stream) or enqueues it on `stream`. */
static ncclResult_t submit(struct ncclComm *c, struct header h, const void *in, size_t in_n, void *out, size_t out_n,
                           cudaStream_t stream) {
  launch_host_func_t launch = stream ? launch_host_func() : NULL;
  if (!launch) return collective(c, h, in, in_n, out, out_n);
  if (c->async_error != ncclSuccess)
    return fail(c->async_error, "emulated NCCL: the communicator failed before (%s); abort it",
                ncclGetErrorString(c->async_error));
  struct queued *q = malloc(sizeof *q);
  if (!q) return fail(ncclSystemError, "emulated NCCL: out of memory");
  *q = (struct queued){c, h, in, in_n, out, out_n};
  int e = launch(stream, run_queued, q);
  if (e != 0) {
    free(q);
    return fail(ncclUnhandledCudaError, "emulated NCCL: cuLaunchHostFunc on the stream failed (CUDA error %d)", e);
  }
  return ncclSuccess;
}

static ncclResult_t check_args(ncclComm_t comm, const char *what, int type, int op) {
  if (!comm) return fail(ncclInvalidArgument, "%s: comm is NULL", what);
  if (type_size(type) == 0)
    return fail(ncclInvalidArgument, "%s: data type %d is not emulated (float16 and bfloat16 are not)", what, type);
  if (op < ncclSum || op > ncclAvg) return fail(ncclInvalidArgument, "%s: reduction op %d is not NCCL's", what, op);
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  ncclResult_t r = check_args(comm, "ncclAllReduce", datatype, op);
  if (r != ncclSuccess) return r;
  if (count && (!sendbuff || !recvbuff)) return fail(ncclInvalidArgument, "ncclAllReduce: NULL buffer");
  struct header h = {OP_ALLREDUCE, datatype, op, 0, count};
  size_t bytes = count * type_size(datatype);
  return submit(comm, h, sendbuff, bytes, recvbuff, bytes, stream);
}

ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  ncclResult_t r = check_args(comm, "ncclBroadcast", datatype, ncclSum);
  if (r != ncclSuccess) return r;
  if (root < 0 || root >= comm->nranks)
    return fail(ncclInvalidArgument, "ncclBroadcast: root %d is not in 0..%d", root, comm->nranks - 1);
  if (count && !recvbuff) return fail(ncclInvalidArgument, "ncclBroadcast: NULL buffer");
  if (count && comm->rank == root && !sendbuff) return fail(ncclInvalidArgument, "ncclBroadcast: NULL send buffer");
  struct header h = {OP_BROADCAST, datatype, ncclSum, root, count};
  size_t bytes = count * type_size(datatype);
  int sends = comm->rank == root;
  return submit(comm, h, sends ? sendbuff : NULL, sends ? bytes : 0, recvbuff, bytes, stream);
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
  ncclResult_t r = check_args(comm, "ncclAllGather", datatype, ncclSum);
  if (r != ncclSuccess) return r;
  if (sendcount && (!sendbuff || !recvbuff)) return fail(ncclInvalidArgument, "ncclAllGather: NULL buffer");
  struct header h = {OP_ALLGATHER, datatype, ncclSum, 0, sendcount};
  size_t bytes = sendcount * type_size(datatype);
  return submit(comm, h, sendbuff, bytes, recvbuff, bytes * (size_t)comm->nranks, stream);
}
