/*
 * vhostuser._fastpath - the compiled burst engine (optional).
 *
 * forward() does for one transmit burst of a virtio-net queue what the pure-Python fast
 * path does frame by frame: take the buffers the driver made available, validate each
 * descriptor, ask the switch fabric where frames go (once per distinct destination/source
 * address pair, through a Python callable), copy each frame into the destination receive
 * rings, write their used entries, and publish the transmit ring's used entries. The
 * receive rings' used entries are NOT published here: the caller publishes them after this
 * returns (a frame must not reach its receiver before its sender has its transmit buffer
 * back). blk_serve() (further down) serves a virtio-blk request queue from a file.
 *
 * Rings are split (virtio 1.2 2.7) or packed (2.8), in any mix. A ring comes as its
 * engine_view tuple: (kind, state, descriptors, avail, used, size, log_gpa), kind 0 split
 * (avail and used are its rings, log_gpa the used ring's address) or 1 packed (avail and
 * used None, log_gpa the descriptor ring's address). Ring state lives in the rings' state
 * blocks (array('q'): virtq/split.py STATE_FIELDS, virtq/packed.py PACKED_STATE_FIELDS);
 * this module reads and updates them in place.
 *
 * It handles only the common layout, exactly like the Python fast path: a transmit buffer
 * of ONE descriptor with no flags, a receive buffer of ONE descriptor with only WRITE, each
 * inside one memory region, no offload fields in the header, no buffers already in flight
 * on either ring. At the first buffer that is anything else it stops and returns what it
 * did; the Python engine then takes that buffer (and reports guest faults). So the bounds
 * and loop checks of the ring engine stay in one place, and this module never makes a
 * ring broken or raises for guest data.
 *
 * Dirty logging (vhost-user.rst "Live migration"): when a ring's owner passes its dirty
 * log (a bitmap, one bit per 4 KiB guest page), every byte written here to that guest's
 * memory - frame copies, used elements, used.idx, used descriptors - sets its page's bit
 * with an atomic OR, as the Python engine does through GuestMemory.mark_dirty.
 *
 * Memory ordering (virtio 1.2 2.7.13 / 2.8.21, barrier.py): split: avail.idx is read with
 * an acquire load before the ring entries it covers; buffer contents and used elements are
 * stored before used.idx, which is stored with a release store. Packed: a descriptor's
 * flags are read with an acquire load before the rest of it; a used descriptor's id and
 * length are stored before its flags, and the flags of the first used descriptor of a
 * batch are stored last (release), so the driver sees the whole batch at once. No full
 * barrier is needed here: the notification checks (store->load) are done by the caller
 * after publishing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/uio.h>

/* State block fields shared by both kinds (STATE_FIELDS / PACKED_STATE_FIELDS). */
#define ST_NA 0
#define ST_UI 1
#define ST_IF 2
#define ST_HELD 3     /* split: 0/1; packed: u16 offset of the held flags, -1 none */
#define ST_PUSHED 4
#define ST_MIN 5
/* Packed only. */
#define PST_AW 5      /* avail wrap counter */
#define PST_UW 6      /* used wrap counter */
#define PST_IFD 7     /* descriptors in flight */
#define PST_HF 8      /* the held flags */
#define PST_SS 9      /* descriptors used since the last notification decision */
#define PST_MIN 10

#define KIND_SPLIT 0
#define KIND_PACKED 1

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define PDESC_F_AVAIL (1u << 7)
#define PDESC_F_USED (1u << 15)
#define PDESC_AU (PDESC_F_AVAIL | PDESC_F_USED)
#define HDR_F_NEEDS_CSUM 1
#define MAX_REGIONS 512
#define MAX_DSTS 64
#define MAX_QUEUE 32768

typedef struct {
    uint64_t g0, g1;    /* guest-physical range [g0, g1) */
    uint8_t *base;      /* host address of guest byte g0 */
} region_t;

typedef struct {
    Py_buffer *bufs;    /* one per region, allocated by regions_load */
    region_t *r;
    int n;
    int last;
} regions_t;

typedef struct {
    Py_buffer b;
    uint8_t *bits;
    uint64_t pages;
    int have;
} dlog_t;

/* Set the dirty bits of [gpa, gpa+len); pages past the log are not marked. */
static inline void log_mark(dlog_t *l, uint64_t gpa, uint64_t len) {
    if (!l->have || len == 0)
        return;
    uint64_t first = gpa >> 12, last = (gpa + len - 1) >> 12;
    if (last >= l->pages) {
        if (first >= l->pages)
            return;
        last = l->pages - 1;
    }
    for (uint64_t p = first; p <= last; p++)
        __atomic_fetch_or(&l->bits[p >> 3], (uint8_t)(1u << (p & 7)), __ATOMIC_RELAXED);
}

static int log_load(dlog_t *l, PyObject *obj) {
    memset(l, 0, sizeof(*l));
    if (obj == Py_None)
        return 0;
    if (PyObject_GetBuffer(obj, &l->b, PyBUF_WRITABLE) < 0)
        return -1;
    l->have = 1;
    l->bits = (uint8_t *)l->b.buf;
    l->pages = 8 * (uint64_t)l->b.len;
    return 0;
}

static void log_release(dlog_t *l) {
    if (l->have) {
        PyBuffer_Release(&l->b);
        l->have = 0;
    }
}

typedef struct {
    Py_buffer st_b, desc_b, avail_b, used_b;
    int have_st, have_desc, have_avail, have_used;
    int64_t *st;
    uint8_t *desc;
    uint16_t *avail;    /* split only */
    uint8_t *used;      /* split only */
    uint32_t size, mask;
    int packed;
    uint64_t log_gpa;   /* split: the used ring; packed: the descriptor ring */
    dlog_t log;
    /* For this call: split: avail.idx as read once; packed: where the next available
       descriptor is looked for (slot, wrap), advanced as buffers are taken. */
    uint16_t avail_idx;
    uint32_t cur;
    int cur_wrap;
    /* Packed, transmit side: the first used descriptor of this call (its flags are
       stored last). */
    int64_t first_off;
    uint16_t first_flags;
} ring_t;

typedef struct {
    ring_t ring;
    regions_t *regs;
    const uint8_t *hdr; /* the receive header for a plain frame */
    Py_ssize_t hl;
    int ok;             /* a spec was given (None: frames to it stop the burst) */
    int64_t frames, bytes, nobuf;
    uint8_t *seen;      /* heads (split) or buffer ids (packed) used in this call */
} dst_t;

static void regions_release(regions_t *rg) {
    for (int i = 0; i < rg->n; i++)
        PyBuffer_Release(&rg->bufs[i]);
    rg->n = 0;
    PyMem_Free(rg->bufs);
    PyMem_Free(rg->r);
    rg->bufs = NULL;
    rg->r = NULL;
}

/* regions: a sequence of (gpa_start, gpa_end, buffer, mmap_offset). */
static int regions_load(regions_t *rg, PyObject *seq) {
    rg->n = 0;
    rg->last = 0;
    rg->bufs = NULL;
    rg->r = NULL;
    PyObject *fast = PySequence_Fast(seq, "regions must be a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_REGIONS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%zd regions, more than %d", n, MAX_REGIONS);
        return -1;
    }
    rg->bufs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_buffer));
    rg->r = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(region_t));
    if (rg->bufs == NULL || rg->r == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(fast, i);
        unsigned long long g0, g1, off;
        PyObject *buf;
        if (!PyArg_ParseTuple(t, "KKOK", &g0, &g1, &buf, &off))
            goto fail;
        if (PyObject_GetBuffer(buf, &rg->bufs[rg->n], PyBUF_WRITABLE) < 0)
            goto fail;
        rg->n++;
        Py_buffer *b = &rg->bufs[rg->n - 1];
        if (g1 < g0 || off > (unsigned long long)b->len
                || g1 - g0 > (unsigned long long)b->len - off) {
            PyErr_Format(PyExc_ValueError, "region %zd: %llx..%llx at offset %llu does not "
                         "fit its %zd-byte mapping", i, g0, g1, off, b->len);
            goto fail;
        }
        rg->r[rg->n - 1].g0 = g0;
        rg->r[rg->n - 1].g1 = g1;
        rg->r[rg->n - 1].base = (uint8_t *)b->buf + off;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    regions_release(rg);
    return -1;
}

/* Host address of guest range [a, a+len) inside one region, or NULL. */
static inline uint8_t *translate(regions_t *rg, uint64_t a, uint64_t len) {
    region_t *r = &rg->r[rg->last];
    if (rg->n && a >= r->g0 && a <= r->g1 && len <= r->g1 - a)
        return r->base + (a - r->g0);
    for (int i = 0; i < rg->n; i++) {
        r = &rg->r[i];
        if (a >= r->g0 && a <= r->g1 && len <= r->g1 - a) {
            rg->last = i;
            return r->base + (a - r->g0);
        }
    }
    return NULL;
}

static void ring_release(ring_t *r) {
    log_release(&r->log);
    if (r->have_used)
        PyBuffer_Release(&r->used_b);
    if (r->have_avail)
        PyBuffer_Release(&r->avail_b);
    if (r->have_desc)
        PyBuffer_Release(&r->desc_b);
    if (r->have_st)
        PyBuffer_Release(&r->st_b);
    r->have_st = r->have_desc = r->have_avail = r->have_used = 0;
}

static inline uint16_t load16_acquire(const uint16_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store16_release(uint16_t *p, uint16_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* A ring's engine_view (kind, state, desc, avail, used, size, log_gpa) and its dirty log
   (None or a writable buffer). Sets up the per-call cursors. */
static int ring_load(ring_t *r, PyObject *view, PyObject *log) {
    memset(r, 0, sizeof(*r));
    int kind;
    PyObject *st, *desc, *avail, *used;
    unsigned long size;
    unsigned long long log_gpa;
    if (!PyArg_ParseTuple(view, "iOOOOkK", &kind, &st, &desc, &avail, &used, &size, &log_gpa))
        return -1;
    if (kind != KIND_SPLIT && kind != KIND_PACKED) {
        PyErr_Format(PyExc_ValueError, "ring kind %d is neither split (0) nor packed (1)",
                     kind);
        return -1;
    }
    r->packed = kind == KIND_PACKED;
    if (size == 0 || size > MAX_QUEUE || (!r->packed && (size & (size - 1)))) {
        PyErr_Format(PyExc_ValueError, "queue size %lu is not valid for a %s ring", size,
                     r->packed ? "packed" : "split");
        return -1;
    }
    if (PyObject_GetBuffer(st, &r->st_b, PyBUF_WRITABLE) < 0)
        goto fail;
    r->have_st = 1;
    if (PyObject_GetBuffer(desc, &r->desc_b, r->packed ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        goto fail;
    r->have_desc = 1;
    if (!r->packed) {
        if (PyObject_GetBuffer(avail, &r->avail_b, PyBUF_SIMPLE) < 0)
            goto fail;
        r->have_avail = 1;
        if (PyObject_GetBuffer(used, &r->used_b, PyBUF_WRITABLE) < 0)
            goto fail;
        r->have_used = 1;
    }
    if (r->st_b.len < (Py_ssize_t)((r->packed ? PST_MIN : ST_MIN) * sizeof(int64_t))
            || r->desc_b.len < (Py_ssize_t)(16 * size)
            || (!r->packed && (r->avail_b.len < (Py_ssize_t)(4 + 2 * size)
                               || r->used_b.len < (Py_ssize_t)(4 + 8 * size)))) {
        PyErr_SetString(PyExc_ValueError, "ring areas or state block too small");
        goto fail;
    }
    r->st = (int64_t *)r->st_b.buf;
    r->desc = (uint8_t *)r->desc_b.buf;
    r->size = (uint32_t)size;
    r->mask = (uint32_t)size - 1;
    r->log_gpa = log_gpa;
    if (r->packed) {
        if (r->st[ST_NA] < 0 || r->st[ST_NA] >= (int64_t)size || r->st[ST_UI] < 0
                || r->st[ST_UI] >= (int64_t)size) {
            PyErr_SetString(PyExc_ValueError, "packed ring state out of range");
            goto fail;
        }
        r->cur = (uint32_t)r->st[ST_NA];
        r->cur_wrap = (int)r->st[PST_AW];
        r->first_off = -1;
    } else {
        r->avail = (uint16_t *)r->avail_b.buf;
        r->used = (uint8_t *)r->used_b.buf;
        r->avail_idx = load16_acquire(&r->avail[1]);
    }
    if (log_load(&r->log, log) < 0)
        goto fail;
    return 0;
fail:
    ring_release(r);
    return -1;
}

/* The next available buffer of r (ring order, from where the ring's state says).
   1: *id (split: the head; packed: the buffer id), *addr, *len, *flags (packed: without
   the AVAIL/USED bits) set; 0: none available; -1: an avail entry the Python engine must
   judge (outside the queue, more than the queue size outstanding). */
static inline int ring_peek(ring_t *r, uint32_t *id, uint64_t *addr, uint32_t *len,
                            uint16_t *flags) {
    const uint8_t *de;
    if (!r->packed) {
        uint16_t na = (uint16_t)r->st[ST_NA];
        uint16_t pending = (uint16_t)(r->avail_idx - na);
        if (pending > r->size)
            return -1;
        if (pending == 0)
            return 0;
        uint32_t h = r->avail[2 + (na & r->mask)];
        if (h >= r->size)
            return -1;
        de = r->desc + 16 * (size_t)h;
        *id = h;
        memcpy(flags, de + 12, 2);
    } else {
        de = r->desc + 16 * (size_t)r->cur;
        uint16_t f = load16_acquire((const uint16_t *)(de + 14));
        uint16_t want = r->cur_wrap ? PDESC_F_AVAIL : PDESC_F_USED;
        if ((f & PDESC_AU) != want)
            return 0;
        uint16_t bid;
        memcpy(&bid, de + 12, 2);
        if (bid >= r->size)
            return -1;
        *id = bid;
        *flags = f & (uint16_t)~PDESC_AU;
    }
    memcpy(addr, de, 8);
    memcpy(len, de + 8, 4);
    return 1;
}

/* True when nothing of r is in flight or held back: the only state this module works
   from (packed: the used position then equals the avail position). */
static inline int ring_idle(ring_t *r) {
    if (r->st[ST_IF] != 0)
        return 0;
    if (!r->packed)
        return 1;
    return r->st[ST_HELD] < 0 && r->st[ST_UI] == r->st[ST_NA] && r->st[PST_UW] == r->st[PST_AW];
}

/* Move past the buffer ring_peek returned (packed: the descriptor cursor). */
static inline void ring_advance(ring_t *r) {
    if (r->packed && ++r->cur == r->size) {
        r->cur = 0;
        r->cur_wrap ^= 1;
    }
}

/* Write the used entry of buffer id with written bytes at the ring's used position and
   move it on. hold: packed: the first flags of this call are kept in first_off/flags for
   ring_finish (transmit) or the state's held fields (receive, deferred publication);
   split: nothing (used.idx is what publishes). */
static inline void ring_use(ring_t *r, uint32_t id, uint32_t written, int defer) {
    if (!r->packed) {
        uint16_t ui = (uint16_t)r->st[ST_UI];
        uint32_t slot = ui & r->mask;
        uint32_t e[2] = {id, written};
        memcpy(r->used + 4 + 8 * (size_t)slot, e, 8);
        log_mark(&r->log, r->log_gpa + 4 + 8 * (uint64_t)slot, 8);
        r->st[ST_UI] = (uint16_t)(ui + 1);
        r->st[ST_NA] = (uint16_t)(r->st[ST_NA] + 1);
        if (defer)
            r->st[ST_HELD] = 1;
        return;
    }
    uint32_t slot = (uint32_t)r->st[ST_UI];
    uint8_t *de = r->desc + 16 * (size_t)slot;
    uint16_t bid = (uint16_t)id;
    memcpy(de + 8, &written, 4);
    memcpy(de + 12, &bid, 2);
    uint16_t f = (uint16_t)((r->st[PST_UW] ? PDESC_AU : 0) | (written ? DESC_F_WRITE : 0));
    int64_t off = 8 * (int64_t)slot + 7;  /* the flags, in 16-bit units */
    if (defer && r->st[ST_HELD] < 0) {
        r->st[ST_HELD] = off;
        r->st[PST_HF] = f;
        r->st[ST_PUSHED] = 0;
    } else if (!defer && r->first_off < 0) {
        r->first_off = off;
        r->first_flags = f;
    } else {
        store16_release((uint16_t *)de + 7, f);
    }
    log_mark(&r->log, r->log_gpa + 16 * (uint64_t)slot + 8, 8);
    if (++slot == r->size) {
        slot = 0;
        r->st[PST_UW] ^= 1;
    }
    r->st[ST_UI] = slot;
    r->st[ST_NA] = r->cur;
    r->st[PST_AW] = r->cur_wrap;
    r->st[PST_SS] += 1;
}

/* Publish what ring_use(defer=0) wrote in this call (taken entries). */
static inline void ring_finish(ring_t *r, uint32_t taken) {
    if (!taken)
        return;
    if (!r->packed) {
        /* Buffer copies and used elements before used.idx (release store). */
        store16_release((uint16_t *)(r->used + 2), (uint16_t)r->st[ST_UI]);
        log_mark(&r->log, r->log_gpa + 2, 2);
        r->st[ST_HELD] = 0;
    } else if (r->first_off >= 0) {
        /* Everything else of the batch before the first used descriptor's flags. */
        store16_release((uint16_t *)r->desc + r->first_off, r->first_flags);
        r->first_off = -1;
    }
    r->st[ST_PUSHED] = 1;
}

/* Where the next receive buffer of d is, for a frame of need bytes.
   1: ptr/id/gpa set; 0: no buffer available (the frame is dropped: no_rx_buffer);
   -1: a buffer the Python engine must take (stop before this frame). */
static int rx_peek(dst_t *d, uint64_t need, uint8_t **ptr, uint32_t *id, uint64_t *gpa) {
    ring_t *r = &d->ring;
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    int got = ring_peek(r, id, &addr, &len, &flags);
    if (got <= 0)
        return got;
    if ((d->seen[*id >> 3] & (1u << (*id & 7))) || flags != DESC_F_WRITE || len < need)
        return -1;
    uint8_t *p = translate(d->regs, addr, need);
    if (p == NULL)
        return -1;
    *ptr = p;
    *gpa = addr;
    return 1;
}

static PyObject *forward(PyObject *self, PyObject *args) {
    PyObject *src_spec, *dsts_obj, *decide;
    Py_ssize_t budget;
    if (!PyArg_ParseTuple(args, "OOOn", &src_spec, &dsts_obj, &decide, &budget))
        return NULL;
    PyObject *s_view, *s_regs, *s_log;
    Py_ssize_t hl, minlen, maxlen;
    if (!PyArg_ParseTuple(src_spec, "OOnnnO", &s_view, &s_regs, &hl, &minlen, &maxlen,
                          &s_log))
        return NULL;
    if (hl < 2 || minlen < hl + 12 || maxlen < minlen) {
        PyErr_SetString(PyExc_ValueError, "bad header or frame length limits");
        return NULL;
    }
    PyObject *dfast = PySequence_Fast(dsts_obj, "dsts must be a sequence");
    if (dfast == NULL)
        return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(dfast);
    if (nd > MAX_DSTS) {
        Py_DECREF(dfast);
        PyErr_Format(PyExc_ValueError, "%zd destinations, more than %d", nd, MAX_DSTS);
        return NULL;
    }

    PyObject *result = NULL;
    ring_t src;
    memset(&src, 0, sizeof(src));
    regions_t *sregs = PyMem_Calloc(1, sizeof(regions_t));
    dst_t *dst = PyMem_Calloc(nd ? nd : 1, sizeof(dst_t));
    regions_t *dregs = PyMem_Calloc(nd ? nd : 1, sizeof(regions_t));
    uint8_t *seen = NULL;
    PyObject *last_key = NULL, *last_targets = NULL;
    if (sregs == NULL || dst == NULL || dregs == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (ring_load(&src, s_view, s_log) < 0)
        goto out;
    if (regions_load(sregs, s_regs) < 0)
        goto out;
    for (Py_ssize_t i = 0; i < nd; i++) {
        PyObject *spec = PySequence_Fast_GET_ITEM(dfast, i);
        dst_t *d = &dst[i];
        if (spec == Py_None)
            continue;
        PyObject *view, *regs, *hdr, *log;
        if (!PyArg_ParseTuple(spec, "OOSO", &view, &regs, &hdr, &log))
            goto out;
        if (ring_load(&d->ring, view, log) < 0)
            goto out;
        d->regs = &dregs[i];
        if (regions_load(d->regs, regs) < 0)
            goto out;
        d->hdr = (const uint8_t *)PyBytes_AS_STRING(hdr);
        d->hl = PyBytes_GET_SIZE(hdr);
        if (d->hl > 64) {
            PyErr_SetString(PyExc_ValueError, "receive header longer than 64 bytes");
            goto out;
        }
        /* Buffers already in flight (a mergeable carry) are the Python engine's; a
           packed ring may hold flags back from this same burst (stored directly then). */
        d->ok = d->ring.st[ST_IF] == 0
                && (!d->ring.packed || (d->ring.st[ST_UI] == d->ring.st[ST_NA]
                                        && d->ring.st[PST_UW] == d->ring.st[PST_AW]));
    }
    {
        /* One bit per head or buffer id of every ring: those used in this call. */
        size_t total = (src.size + 7) / 8;
        for (Py_ssize_t i = 0; i < nd; i++)
            total += (dst[i].ring.size + 7) / 8;
        seen = PyMem_Calloc(total ? total : 1, 1);
        if (seen == NULL) {
            PyErr_NoMemory();
            goto out;
        }
        size_t at = (src.size + 7) / 8;
        for (Py_ssize_t i = 0; i < nd; i++) {
            dst[i].seen = seen + at;
            at += (dst[i].ring.size + 7) / 8;
        }
    }

    uint32_t taken = 0;
    int64_t rx_bytes = 0, flooded = 0, filtered = 0;
    const char *stop = "empty";
    int failed = 0;
    if (!ring_idle(&src)) {
        stop = "in-flight";
        goto finish;
    }
    {
        uint8_t *sseen = seen;
        uint8_t *ptrs[MAX_DSTS];
        uint32_t ids[MAX_DSTS];
        uint64_t gpas[MAX_DSTS];
        int take[MAX_DSTS];
        for (;;) {
            if ((Py_ssize_t)taken >= budget) {
                stop = "done";
                break;
            }
            uint32_t h;
            uint64_t addr;
            uint32_t len;
            uint16_t flags;
            int got = ring_peek(&src, &h, &addr, &len, &flags);
            if (got == 0) {
                stop = taken ? "done" : "empty";
                break;
            }
            if (got < 0 || (sseen[h >> 3] & (1u << (h & 7)))) {
                stop = "head";
                break;
            }
            if (flags != 0 || len < (uint64_t)minlen || len > (uint64_t)maxlen) {
                stop = "layout";
                break;
            }
            uint8_t *p = translate(sregs, addr, len);
            if (p == NULL) {
                stop = "unmapped";
                break;
            }
            if ((p[0] & HDR_F_NEEDS_CSUM) || p[1]) {
                stop = "offload";
                break;
            }
            const uint8_t *frame = p + hl;
            uint64_t flen = len - (uint64_t)hl;
            /* The fabric's decision for this (destination, source) pair. */
            if (last_key == NULL || memcmp(PyBytes_AS_STRING(last_key), frame, 12) != 0) {
                PyObject *key = PyBytes_FromStringAndSize((const char *)frame, 12);
                if (key == NULL) {
                    failed = 1;
                    break;
                }
                PyObject *res = PyObject_CallOneArg(decide, key);
                if (res == NULL) {
                    Py_DECREF(key);
                    failed = 1;
                    break;
                }
                Py_XDECREF(last_key);
                Py_XDECREF(last_targets);
                last_key = key;
                last_targets = res;
                if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2
                        || !PyTuple_Check(PyTuple_GET_ITEM(res, 0))) {
                    PyErr_SetString(PyExc_TypeError,
                                    "decide() must return (tuple of indices, kind)");
                    failed = 1;
                    break;
                }
            }
            PyObject *targets = PyTuple_GET_ITEM(last_targets, 0);
            long kind = PyLong_AsLong(PyTuple_GET_ITEM(last_targets, 1));
            if (kind == -1 && PyErr_Occurred()) {
                failed = 1;
                break;
            }
            Py_ssize_t nt = PyTuple_GET_SIZE(targets);
            /* First every target is checked, then copies are made: a frame is either
               handled here completely or left whole to the Python engine. */
            int bail = 0;
            for (Py_ssize_t t = 0; t < nt && !bail; t++) {
                Py_ssize_t di = PyLong_AsSsize_t(PyTuple_GET_ITEM(targets, t));
                if (di < 0 || di >= nd) {
                    if (!PyErr_Occurred())
                        PyErr_Format(PyExc_IndexError, "destination %zd of %zd", di, nd);
                    failed = 1;
                    break;
                }
                dst_t *d = &dst[di];
                for (Py_ssize_t u = 0; u < t; u++)
                    if (PyLong_AsSsize_t(PyTuple_GET_ITEM(targets, u)) == di)
                        bail = 1;  /* a destination named twice: leave it to Python */
                if (!d->ok || bail) {
                    bail = 1;
                    break;
                }
                int r = rx_peek(d, (uint64_t)d->hl + flen, &ptrs[t], &ids[t], &gpas[t]);
                if (r < 0)
                    bail = 1;
                take[t] = r;
            }
            if (failed)
                break;
            if (bail) {
                stop = "destination";
                break;
            }
            for (Py_ssize_t t = 0; t < nt; t++) {
                dst_t *d = &dst[PyLong_AsSsize_t(PyTuple_GET_ITEM(targets, t))];
                if (!take[t]) {
                    d->nobuf++;
                    continue;
                }
                uint8_t *q = ptrs[t];
                memcpy(q, d->hdr, (size_t)d->hl);
                memcpy(q + d->hl, frame, (size_t)flen);
                ring_t *r = &d->ring;
                log_mark(&r->log, gpas[t], (uint64_t)d->hl + flen);
                ring_advance(r);
                ring_use(r, ids[t], (uint32_t)(d->hl + flen), 1);
                d->seen[ids[t] >> 3] |= (uint8_t)(1u << (ids[t] & 7));
                d->frames++;
                d->bytes += (int64_t)flen;
            }
            if (kind == 1)
                flooded++;
            else if (kind == 2)
                filtered++;
            sseen[h >> 3] |= (uint8_t)(1u << (h & 7));
            ring_advance(&src);
            ring_use(&src, h, 0, 0);
            rx_bytes += (int64_t)flen;
            taken++;
        }
        ring_finish(&src, taken);
    }
finish:
    if (failed) {
        /* What was taken is complete and published; report the callback's error. */
        goto out;
    }
    {
        PyObject *per = PyList_New(nd);
        if (per == NULL)
            goto out;
        for (Py_ssize_t i = 0; i < nd; i++) {
            PyObject *t = Py_BuildValue("(LLL)", (long long)dst[i].frames,
                                        (long long)dst[i].bytes, (long long)dst[i].nobuf);
            if (t == NULL) {
                Py_DECREF(per);
                goto out;
            }
            PyList_SET_ITEM(per, i, t);
        }
        result = Py_BuildValue("(ILLLNs)", taken, (long long)rx_bytes, (long long)flooded,
                               (long long)filtered, per, stop);
    }
out:
    Py_XDECREF(last_key);
    Py_XDECREF(last_targets);
    if (dst != NULL) {
        for (Py_ssize_t i = 0; i < nd; i++) {
            ring_release(&dst[i].ring);
            if (dst[i].regs != NULL)
                regions_release(dst[i].regs);
        }
    }
    ring_release(&src);
    if (sregs != NULL)
        regions_release(sregs);
    PyMem_Free(sregs);
    PyMem_Free(dst);
    PyMem_Free(dregs);
    PyMem_Free(seen);
    Py_DECREF(dfast);
    return result;
}

/* ---------------------------------------------------------------------------------------
 * blk_serve(): one burst of a virtio-blk split request queue, read and write requests
 * straight between the image file and guest buffers (preadv/pwritev on the guest memory
 * itself, the GIL released around each call), completions published with one used.idx
 * store, the inflight area (vhost-user.rst "Inflight I/O tracking", split) kept in step.
 *
 * Like forward() it takes only what it fully understands and stops before anything
 * else, so every validation message and every other request type stays in the Python
 * engine: a chain of direct descriptors linked by NEXT, or one INDIRECT descriptor whose
 * table links entries by NEXT; every buffer inside one memory region; readable before
 * writable; the 16-byte request header inside the first readable buffer; type IN or OUT
 * (the BARRIER bit ignored, as the Python engine does); whole sectors, aligned to the
 * logical block size, inside the capacity; a writable status byte. Stops: "layout",
 * "unmapped", "type", "range", "head", "avail", "in-flight".
 *
 * I/O errors give the request the IOERR status, exactly as the Python engine does for an
 * OSError (a read that hits the end of the file included); the last errno is returned so
 * the caller can log it.
 * --------------------------------------------------------------------------------------- */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_BARRIER 0x80000000u
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define MAX_SEGS 256
#define IOVS_MAX 1024

typedef struct {
    uint8_t *p;
    uint64_t gpa;
    uint32_t len;
    int write;
} seg_t;

/* Walk the chain at head h of r into segs (zero-length buffers skipped).
   Returns the number of segments, or -1 with *why set (the Python engine takes it). */
static int blk_walk(ring_t *r, regions_t *rg, uint32_t h, int indirect_ok, seg_t *segs,
                    const char **why) {
    const uint8_t *table = r->desc;
    uint32_t limit = r->size, idx = h, hops = 0;
    int in_table = 0, in_write = 0, n = 0;
    uint64_t total = 0;
    for (;;) {
        if (hops == limit) {
            *why = "layout";
            return -1;
        }
        hops++;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        const uint8_t *de = table + 16 * (size_t)idx;
        memcpy(&addr, de, 8);
        memcpy(&len, de + 8, 4);
        memcpy(&flags, de + 12, 2);
        memcpy(&next, de + 14, 2);
        if (flags & DESC_F_INDIRECT) {
            if (in_table || !indirect_ok || (flags & DESC_F_NEXT) || len == 0 || (len & 15)
                    || (len >> 4) > r->size) {
                *why = "layout";
                return -1;
            }
            const uint8_t *t = translate(rg, addr, len);
            if (t == NULL) {
                *why = "unmapped";
                return -1;
            }
            table = t;
            limit = len >> 4;
            in_table = 1;
            hops = 0;
            idx = 0;
            continue;
        }
        total += len;
        if (total > 0xFFFFFFFFull) {
            *why = "layout";
            return -1;
        }
        int w = (flags & DESC_F_WRITE) != 0;
        if (!w && in_write) {
            *why = "layout";
            return -1;
        }
        in_write |= w;
        if (len) {
            if (n == MAX_SEGS) {
                *why = "layout";
                return -1;
            }
            uint8_t *p = translate(rg, addr, len);
            if (p == NULL) {
                *why = "unmapped";
                return -1;
            }
            segs[n].p = p;
            segs[n].gpa = addr;
            segs[n].len = len;
            segs[n].write = w;
            n++;
        }
        if (!(flags & DESC_F_NEXT))
            return n;
        if (next >= limit) {
            *why = "layout";
            return -1;
        }
        idx = next;
    }
}

/* Do the whole transfer [iov, iov+cnt) at off; 0 or an errno (EIO for end of file). */
static int blk_transfer(int fd, struct iovec *iov, int cnt, uint64_t off, int write) {
    while (cnt > 0) {
        ssize_t got;
        int cur = cnt > IOVS_MAX ? IOVS_MAX : cnt;
        Py_BEGIN_ALLOW_THREADS
        got = write ? pwritev(fd, iov, cur, (off_t)off) : preadv(fd, iov, cur, (off_t)off);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (got == 0)
            return EIO;
        off += (uint64_t)got;
        while (cnt > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && got) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

static PyObject *blk_serve(PyObject *self, PyObject *args) {
    PyObject *view, *regs, *log, *inflight, *tstate;
    unsigned long long capacity;
    int fd, read_only, indirect_ok;
    unsigned long blk_size;
    Py_ssize_t budget;
    if (!PyArg_ParseTuple(args, "OOOiKkppnOO", &view, &regs, &log, &fd, &capacity, &blk_size,
                          &read_only, &indirect_ok, &budget, &inflight, &tstate))
        return NULL;
    if (blk_size < 512 || (blk_size & (blk_size - 1))) {
        PyErr_Format(PyExc_ValueError, "blk_size %lu is not a power of two >= 512", blk_size);
        return NULL;
    }
    PyObject *result = NULL;
    ring_t r;
    memset(&r, 0, sizeof(r));
    regions_t *rg = PyMem_Calloc(1, sizeof(regions_t));
    seg_t *segs = PyMem_Malloc(MAX_SEGS * sizeof(seg_t));
    struct iovec *iov = PyMem_Malloc(MAX_SEGS * sizeof(struct iovec));
    uint8_t *seen = NULL;
    uint16_t *heads = NULL;
    Py_buffer ib, tb;
    int have_ib = 0, have_tb = 0;
    if (rg == NULL || segs == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (ring_load(&r, view, log) < 0)
        goto out;
    if (r.packed) {
        PyErr_SetString(PyExc_ValueError, "blk_serve takes split rings only");
        goto out;
    }
    seen = PyMem_Calloc((r.size + 7) / 8, 1);
    heads = PyMem_Malloc(r.size * sizeof(uint16_t));
    if (seen == NULL || heads == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (regions_load(rg, regs) < 0)
        goto out;
    /* The inflight region of this queue (header 16 bytes, then 16 bytes per descriptor)
       and the tracker's state block (counter, last_batch_head, in_flight). */
    uint8_t *ia = NULL;
    int64_t *ts = NULL;
    if (inflight != Py_None) {
        if (PyObject_GetBuffer(inflight, &ib, PyBUF_WRITABLE) < 0)
            goto out;
        have_ib = 1;
        if (PyObject_GetBuffer(tstate, &tb, PyBUF_WRITABLE) < 0)
            goto out;
        have_tb = 1;
        if (ib.len < (Py_ssize_t)(16 + 16 * (size_t)r.size) || tb.len < 3 * (Py_ssize_t)sizeof(int64_t)) {
            PyErr_SetString(PyExc_ValueError, "inflight region or tracker state too small");
            goto out;
        }
        ia = (uint8_t *)ib.buf;
        ts = (int64_t *)tb.buf;
    }

    const char *stop = "empty";
    uint32_t taken = 0;
    long long nread = 0, nwrite = 0, rerr = 0, werr = 0, last_errno = 0;
    uint64_t last_sector = 0;
    uint16_t na = (uint16_t)r.st[ST_NA];
    uint16_t ui = (uint16_t)r.st[ST_UI];
    uint64_t blk_mask = (blk_size >> 9) - 1;
    if (r.st[ST_IF] != 0) {
        stop = "in-flight";
        goto finish;
    }
    {
        uint16_t idx = load16_acquire(&r.avail[1]);
        uint32_t pending = (uint16_t)(idx - na);
        if (pending > r.size) {
            stop = "avail";
            goto finish;
        }
        if ((Py_ssize_t)pending > budget)
            pending = (uint32_t)budget;
        stop = pending ? "done" : "empty";
        for (uint32_t k = 0; k < pending; k++) {
            uint32_t h = r.avail[2 + ((uint16_t)(na + k) & r.mask)];
            if (h >= r.size || (seen[h >> 3] & (1u << (h & 7)))) {
                stop = "head";
                break;
            }
            const char *why = NULL;
            int n = blk_walk(&r, rg, h, indirect_ok, segs, &why);
            if (n < 0) {
                stop = why;
                break;
            }
            int nr = 0;
            uint64_t rlen = 0, wlen = 0;
            while (nr < n && !segs[nr].write)
                rlen += segs[nr++].len;
            for (int i = nr; i < n; i++)
                wlen += segs[i].len;
            if (nr == 0 || segs[0].len < 16 || wlen == 0) {
                stop = "layout";
                break;
            }
            uint32_t type;
            uint64_t sector;
            memcpy(&type, segs[0].p, 4);
            memcpy(&sector, segs[0].p + 8, 8);
            type &= ~BLK_T_BARRIER;
            if ((type != BLK_T_IN && type != BLK_T_OUT) || (type == BLK_T_OUT && read_only)) {
                stop = "type";
                break;
            }
            uint64_t nbytes = type == BLK_T_IN ? wlen - 1 : rlen - 16;
            /* As the Python engine's _range_ok (qemu-storage-daemon's rule). */
            if ((nbytes & 511) || (sector & blk_mask) || sector > capacity
                    || (nbytes >> 9) > capacity - sector) {
                stop = "range";
                break;
            }
            /* Tracked before any side effect: counter, then the inflight flag. */
            if (ia != NULL) {
                uint64_t c = (uint64_t)ts[0];
                memcpy(ia + 16 + 16 * (size_t)h + 8, &c, 8);
                __atomic_store_n(ia + 16 + 16 * (size_t)h, (uint8_t)1, __ATOMIC_RELEASE);
                ts[0] = (int64_t)(c + 1);
                ts[2]++;
            }
            int cnt = 0;
            if (type == BLK_T_IN) {
                uint64_t left = nbytes;
                for (int i = nr; i < n && left; i++) {
                    uint64_t l = segs[i].len < left ? segs[i].len : left;
                    iov[cnt].iov_base = segs[i].p;
                    iov[cnt].iov_len = (size_t)l;
                    cnt++;
                    left -= l;
                }
            } else {
                uint64_t skip = 16;
                for (int i = 0; i < nr; i++) {
                    if (skip >= segs[i].len) {
                        skip -= segs[i].len;
                        continue;
                    }
                    iov[cnt].iov_base = segs[i].p + skip;
                    iov[cnt].iov_len = segs[i].len - (size_t)skip;
                    cnt++;
                    skip = 0;
                }
            }
            int err = nbytes ? blk_transfer(fd, iov, cnt, sector << 9, type == BLK_T_OUT) : 0;
            uint8_t status = err ? BLK_S_IOERR : BLK_S_OK;
            if (err) {
                last_errno = err;
                last_sector = sector;
                if (type == BLK_T_IN)
                    rerr++;
                else
                    werr++;
            } else if (type == BLK_T_IN) {
                nread++;
            } else {
                nwrite++;
            }
            /* The status is the last writable byte; the used length is the whole writable
               part (as qemu-storage-daemon reports it), all of it marked dirty. */
            segs[n - 1].p[segs[n - 1].len - 1] = status;
            for (int i = nr; i < n; i++)
                log_mark(&r.log, segs[i].gpa, segs[i].len);
            uint16_t slot = (uint16_t)(ui + taken) & r.mask;
            uint32_t e[2] = {h, (uint32_t)wlen};
            memcpy(r.used + 4 + 8 * (size_t)slot, e, 8);
            log_mark(&r.log, r.log_gpa + 4 + 8 * (uint64_t)slot, 8);
            seen[h >> 3] |= (uint8_t)(1u << (h & 7));
            heads[taken++] = (uint16_t)h;
        }
        if (taken) {
            uint16_t nu = (uint16_t)(ui + taken);
            if (ia != NULL) {
                /* Before used.idx moves: link the batch (desc.next, last_batch_head). */
                uint16_t lbh = (uint16_t)ts[1];
                for (uint32_t i = 0; i < taken; i++) {
                    memcpy(ia + 16 + 16 * (size_t)heads[i] + 6, &lbh, 2);
                    lbh = heads[i];
                    __atomic_store_n((uint16_t *)(ia + 12), lbh, __ATOMIC_RELEASE);
                }
                ts[1] = lbh;
            }
            /* Status bytes, data and used elements before used.idx (release store). */
            store16_release((uint16_t *)(r.used + 2), nu);
            log_mark(&r.log, r.log_gpa + 2, 2);
            if (ia != NULL) {
                /* After: clear the inflight flags, then the area's used_idx. */
                for (uint32_t i = 0; i < taken; i++)
                    __atomic_store_n(ia + 16 + 16 * (size_t)heads[i], (uint8_t)0,
                                     __ATOMIC_RELEASE);
                __atomic_store_n((uint16_t *)(ia + 14), nu, __ATOMIC_RELEASE);
                ts[2] -= taken;
            }
            r.st[ST_UI] = nu;
            r.st[ST_NA] = (uint16_t)(na + taken);
            r.st[ST_HELD] = 0;
            r.st[ST_PUSHED] = 1;
        }
    }
finish:
    result = Py_BuildValue("(ILLLLLKs)", taken, nread, nwrite, rerr, werr, last_errno,
                           (unsigned long long)last_sector, stop);
out:
    if (have_tb)
        PyBuffer_Release(&tb);
    if (have_ib)
        PyBuffer_Release(&ib);
    ring_release(&r);
    if (rg != NULL)
        regions_release(rg);
    PyMem_Free(rg);
    PyMem_Free(segs);
    PyMem_Free(iov);
    PyMem_Free(seen);
    PyMem_Free(heads);
    return result;
}

/* log_mark(bitmap, gpa, length) -> bool: the Python engine's dirty-log writes, with the
 * same atomic OR as the bursts above (vhost-user.rst "Live migration": updates to the log
 * must be atomic; the log is shared with the front-end and with other back-ends of the same
 * guest, so a plain read-modify-write of a byte could undo another writer's bit). Returns
 * True if part of the range lies past the end of the log (those pages are not marked). */
static PyObject *py_log_mark(PyObject *self, PyObject *args) {
    PyObject *obj;
    unsigned long long gpa, len;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKK", &obj, &gpa, &len))
        return NULL;
    if (len == 0)
        Py_RETURN_FALSE;
    if (len - 1 > UINT64_MAX - gpa) /* wraps 2**64: mark up to the top */
        len = UINT64_MAX - gpa + 1;
    dlog_t l;
    if (log_load(&l, obj) < 0)
        return NULL;
    int beyond = l.have && ((gpa + len - 1) >> 12) >= l.pages;
    log_mark(&l, gpa, len);
    log_release(&l);
    return PyBool_FromLong(beyond);
}

static PyMethodDef methods[] = {
    {"log_mark", py_log_mark, METH_VARARGS,
     "log_mark(bitmap, gpa, length) -> bool\n\nSet the dirty bits of every 4 KiB page "
     "[gpa, gpa+length) touches, each with an atomic OR; True if part of the range is past "
     "the end of the bitmap (not marked)."},
    {"forward", forward, METH_VARARGS,
     "forward((ring_view, regions, hdr_len, min_len, max_len, log), dsts, decide, budget) "
     "-> (taken, rx_bytes, flooded, filtered, per_dst, stop)\n\n"
     "One transmit burst of a split or packed ring switched into receive rings of either "
     "kind; dsts: None or (ring_view, regions, rx_header, log) each (see the module "
     "source for the contract)."},
    {"blk_serve", blk_serve, METH_VARARGS,
     "blk_serve(ring_view, regions, log, fd, capacity, blk_size, read_only, indirect, "
     "budget, inflight_region, tracker_state) -> (taken, "
     "reads, writes, read_errors, write_errors, last_errno, last_sector, stop)\n\n"
     "One burst of a virtio-blk split request queue served from a file descriptor (see "
     "the module source for the contract)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vhostuser._fastpath",
    "The compiled burst engine of vhostuser (optional; see vhostuser.engine).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "ABI", 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
