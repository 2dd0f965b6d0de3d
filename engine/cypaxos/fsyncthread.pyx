# cython: language_level=3
"""A native thread that runs fsyncs for the write-ahead log, without the GIL.

Why not a Python thread: a Python worker must take the GIL to start after it is
signalled and again to report back, and the event loop thread holds the GIL whenever
it runs.  On a small machine those two hand-offs cost about as much as the fdatasync
itself (~70-90 us each, measured).  This thread is plain C: it waits on a condition
variable, runs fdatasync (and fsync of the directory when asked), stores the result
and writes one byte to a pipe, which the event loop watches like any socket.

Protocol (one job at a time; the Trio side enforces it):

    worker.submit(fd, dir_fd)      # start; dir_fd -1 for none
    await trio.lowlevel.wait_readable(worker.fileno())
    error = worker.take()          # 0, or the errno of the failed call

Linux/POSIX only.  Not part of the pure core: this module exists to do I/O.
"""
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EAGAIN, EINTR

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)
    int fsync(int fd)
    int pipe(int fds[2])
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_SETFL
    int F_SETFD
    int O_NONBLOCK
    int FD_CLOEXEC


cdef struct State:
    pthread_mutex_t lock
    pthread_cond_t cond
    # Guarded by lock.  Invariant: at most one of (pending, running) is set at a time,
    # and `done` is set only after the job's result is stored.
    int pending        # a job was submitted and not yet picked up
    int stopping       # end the thread once no job is pending
    int fd
    int dir_fd
    int error          # errno of the last job (0: it succeeded)
    int pipe_read      # the event loop waits on this end
    int pipe_write     # the thread writes one byte per finished job


cdef void *_run(void *arg) noexcept nogil:
    cdef State *s = <State *>arg
    cdef int fd, dir_fd, error
    cdef char one = 1
    while True:
        pthread_mutex_lock(&s.lock)
        while not s.pending and not s.stopping:
            pthread_cond_wait(&s.cond, &s.lock)
        if not s.pending:
            pthread_mutex_unlock(&s.lock)
            return NULL
        fd = s.fd
        dir_fd = s.dir_fd
        s.pending = 0
        pthread_mutex_unlock(&s.lock)

        error = 0
        if fdatasync(fd) != 0:
            error = errno
        elif dir_fd >= 0 and fsync(dir_fd) != 0:
            error = errno

        pthread_mutex_lock(&s.lock)
        s.error = error
        pthread_mutex_unlock(&s.lock)
        while write(s.pipe_write, &one, 1) < 0 and errno == EINTR:
            pass


cdef class FsyncThread:
    """One native fsync thread and the pipe it reports on (see the module docstring)."""

    cdef State *state
    cdef pthread_t thread
    cdef bint started
    cdef bint in_flight

    def __cinit__(self):
        cdef int fds[2]
        cdef int rc
        self.state = <State *>malloc(sizeof(State))
        if self.state == NULL:
            raise MemoryError()
        self.started = False
        self.in_flight = False
        if pipe(fds) != 0:
            free(self.state)
            self.state = NULL
            raise OSError(errno, "pipe() failed")
        fcntl(fds[0], F_SETFL, O_NONBLOCK)
        fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        self.state.pipe_read = fds[0]
        self.state.pipe_write = fds[1]
        self.state.pending = 0
        self.state.stopping = 0
        self.state.error = 0
        self.state.fd = -1
        self.state.dir_fd = -1
        pthread_mutex_init(&self.state.lock, NULL)
        pthread_cond_init(&self.state.cond, NULL)
        rc = pthread_create(&self.thread, NULL, _run, self.state)
        if rc != 0:
            self._free()
            raise OSError(rc, "cannot start the fsync thread")
        self.started = True

    def fileno(self):
        """The fd that becomes readable when a submitted job has finished."""
        if self.state == NULL:
            raise ValueError("the fsync thread is closed")
        return self.state.pipe_read

    @property
    def busy(self):
        """True from submit() until take() collected the job's result."""
        return self.in_flight

    def submit(self, int fd, int dir_fd=-1):
        """Start fdatasync(fd), then fsync(dir_fd) unless it is -1; returns at once."""
        if self.state == NULL:
            raise ValueError("the fsync thread is closed")
        if self.in_flight:
            raise RuntimeError("an fsync is already in flight")
        self.in_flight = True
        with nogil:
            pthread_mutex_lock(&self.state.lock)
            self.state.fd = fd
            self.state.dir_fd = dir_fd
            self.state.pending = 1
            pthread_cond_signal(&self.state.cond)
            pthread_mutex_unlock(&self.state.lock)

    def take(self):
        """The finished job's result: None, or -1 if it has not finished yet.

        Raises OSError (with the errno) if the fdatasync or fsync failed.
        """
        cdef char buf[16]
        cdef ssize_t n
        cdef int error
        if self.state == NULL:
            raise ValueError("the fsync thread is closed")
        n = read(self.state.pipe_read, buf, 16)
        if n <= 0:
            if n < 0 and errno != EAGAIN and errno != EINTR:
                raise OSError(errno, "reading the fsync thread's pipe failed")
            return -1
        self.in_flight = False
        with nogil:
            pthread_mutex_lock(&self.state.lock)
            error = self.state.error
            pthread_mutex_unlock(&self.state.lock)
        if error:
            raise OSError(error, "fdatasync failed")
        return None

    def close(self):
        """Stop the thread (after the job in flight, if any, has finished). Idempotent."""
        self._stop()

    cdef void _stop(self) noexcept:
        if self.state == NULL:
            return
        if self.started:
            with nogil:
                pthread_mutex_lock(&self.state.lock)
                self.state.stopping = 1
                pthread_cond_signal(&self.state.cond)
                pthread_mutex_unlock(&self.state.lock)
                pthread_join(self.thread, NULL)
            self.started = False
        self._free()

    cdef void _free(self) noexcept:
        close(self.state.pipe_read)
        close(self.state.pipe_write)
        pthread_cond_destroy(&self.state.cond)
        pthread_mutex_destroy(&self.state.lock)
        free(self.state)
        self.state = NULL

    def __dealloc__(self):
        self._stop()
