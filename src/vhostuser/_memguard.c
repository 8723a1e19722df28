/*
 * vhostuser._memguard - survive guest memory that shrinks under our mappings (optional).
 *
 * A front-end hands us guest RAM as file descriptors and we map them MAP_SHARED. If it
 * truncates such a file afterwards, the next access to a page past the new end raises
 * SIGBUS, and the default action kills the whole process: every other connection of a
 * switch or a disk server dies with the one that misbehaved. Memfds are sealed against
 * shrinking where the front-end allowed it (io/mapping.py); files on tmpfs or hugetlbfs
 * (QEMU's -mem-path, memory-backend-file) cannot be sealed, so they are guarded here.
 *
 * guard_add() registers a mapped range. The SIGBUS handler (installed once, on the first
 * guard_add) looks the faulting address up among the registered ranges. If it is in one,
 * it maps private anonymous memory over the faulting page (the huge page for hugetlbfs,
 * given as the range's alignment), counts the fault on the range, writes to an eventfd
 * (write(2) is async-signal-safe) and returns: the faulting load or store runs again and
 * sees zeros, so whatever was running (the Python interpreter copying a frame, the
 * compiled engine) finishes its step, and the owner of the range, woken by the eventfd,
 * closes the connection that owns the range and unmaps it (the overlay goes with it).
 * An address outside every range is not ours: the previous disposition is restored and
 * the fault re-runs into it (the default kills the process with the usual core dump;
 * Python's faulthandler, if enabled, prints its traceback first).
 *
 * The table is a fixed array of slots written only with the GIL held; the handler only
 * reads it. A slot's start address is stored last with release semantics (and cleared
 * first on removal), so the handler, reading it with acquire, never sees a half-written
 * slot. mmap(2) is not on POSIX's async-signal-safe list, but on Linux it is a plain
 * system call with no user-space locks; the fault was raised by the kernel on this very
 * thread, so no lock of ours is held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUARD_SLOTS 1024

typedef struct {
    uintptr_t start;      /* 0: free. Read by the handler with acquire. */
    uintptr_t end;
    uintptr_t align;      /* page size of the mapping (huge page size for hugetlbfs) */
    uint64_t faults;      /* updated by the handler (atomic add) */
    uintptr_t first;      /* address of the first fault */
} guard_slot;

static guard_slot slots[GUARD_SLOTS];
static int notify_fd = -1;
static uint64_t generation;
static int installed;
static struct sigaction previous;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    int saved = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;
    (void)context;
    if (info->si_code > 0) { /* raised by the kernel for a memory access */
        for (int i = 0; i < GUARD_SLOTS; i++) {
            uintptr_t start = __atomic_load_n(&slots[i].start, __ATOMIC_ACQUIRE);
            if (start == 0 || addr < start || addr >= slots[i].end)
                continue;
            uintptr_t align = slots[i].align;
            uintptr_t page = addr & ~(align - 1);
            if (page < start)
                page = start;
            void *p = mmap((void *)page, align, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (p == MAP_FAILED)
                break; /* cannot repair: fall through to the previous disposition */
            uintptr_t none = 0;
            __atomic_compare_exchange_n(&slots[i].first, &none, addr, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
            __atomic_add_fetch(&slots[i].faults, 1, __ATOMIC_RELEASE);
            __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
            int fd = __atomic_load_n(&notify_fd, __ATOMIC_ACQUIRE);
            if (fd >= 0) {
                uint64_t one = 1;
                ssize_t w = write(fd, &one, sizeof one);
                (void)w; /* a full eventfd counter is still readable: nothing is lost */
            }
            errno = saved;
            return;
        }
    }
    /* Not ours: hand it to whoever had it before, and let it happen again there. */
    sigaction(SIGBUS, &previous, NULL);
    if (info->si_code <= 0)
        raise(sig); /* sent by kill(2)/tgkill(2): re-running nothing would lose it */
    errno = saved;
}

static int install(void) {
    if (installed)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static PyObject *guard_add(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long align;
    if (!PyArg_ParseTuple(args, "y*K", &view, &align))
        return NULL;
    uintptr_t start = (uintptr_t)view.buf;
    uintptr_t end = start + (uintptr_t)view.len;
    PyBuffer_Release(&view); /* only the address is kept: the owner unmaps, then removes */
    if (align == 0 || (align & (align - 1)) != 0 || start == 0 || end <= start ||
        (start & (align - 1)) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "guard_add: range %#lx..%#lx with alignment %#llx is not page aligned",
                     (unsigned long)start, (unsigned long)end, align);
        return NULL;
    }
    if (install() < 0)
        return NULL;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (__atomic_load_n(&slots[i].start, __ATOMIC_RELAXED) != 0)
            continue;
        slots[i].end = end;
        slots[i].align = (uintptr_t)align;
        __atomic_store_n(&slots[i].faults, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&slots[i].first, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&slots[i].start, start, __ATOMIC_RELEASE);
        return PyLong_FromLong(i);
    }
    PyErr_Format(PyExc_OSError, "guard_add: all %d guard slots are in use", GUARD_SLOTS);
    return NULL;
}

static int slot_arg(PyObject *args, const char *what) {
    int i;
    if (!PyArg_ParseTuple(args, "i", &i))
        return -1;
    if (i < 0 || i >= GUARD_SLOTS) {
        PyErr_Format(PyExc_ValueError, "%s: slot %d out of range", what, i);
        return -1;
    }
    return i;
}

static PyObject *guard_remove(PyObject *self, PyObject *args) {
    int i = slot_arg(args, "guard_remove");
    if (i < 0)
        return NULL;
    __atomic_store_n(&slots[i].start, 0, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *guard_faults(PyObject *self, PyObject *args) {
    int i = slot_arg(args, "guard_faults");
    if (i < 0)
        return NULL;
    uint64_t n = __atomic_load_n(&slots[i].faults, __ATOMIC_ACQUIRE);
    uintptr_t first = __atomic_load_n(&slots[i].first, __ATOMIC_RELAXED);
    uintptr_t start = __atomic_load_n(&slots[i].start, __ATOMIC_RELAXED);
    unsigned long long off = (first != 0 && start != 0 && first >= start)
                                 ? (unsigned long long)(first - start) : 0ULL;
    return Py_BuildValue("(KK)", (unsigned long long)n, off);
}

static PyObject *guard_generation(PyObject *self, PyObject *noargs) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&generation, __ATOMIC_ACQUIRE));
}

static PyObject *guard_notify(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    __atomic_store_n(&notify_fd, fd, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"guard_add", guard_add, METH_VARARGS,
     "guard_add(buffer, align) -> slot\n\nGuard the memory of a mapped buffer: a SIGBUS "
     "inside it maps zeros over the page and counts a fault instead of killing the "
     "process. Installs the SIGBUS handler on first use."},
    {"guard_remove", guard_remove, METH_VARARGS,
     "guard_remove(slot)\n\nForget a guarded range (call after unmapping it)."},
    {"guard_faults", guard_faults, METH_VARARGS,
     "guard_faults(slot) -> (faults, first_offset)\n\nFaults caught in a range and the "
     "offset of the first one from the range's start."},
    {"guard_generation", guard_generation, METH_NOARGS,
     "guard_generation() -> int\n\nTotal faults caught so far (changes on every fault)."},
    {"guard_notify", guard_notify, METH_VARARGS,
     "guard_notify(fd)\n\nAn eventfd written on every caught fault (-1: none)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vhostuser._memguard",
    "SIGBUS guard for guest memory that cannot be sealed (optional; see "
    "vhostuser.io.memguard).", -1, methods,
};

PyMODINIT_FUNC PyInit__memguard(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SLOTS", GUARD_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
