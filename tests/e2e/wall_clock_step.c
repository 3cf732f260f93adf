/* LD_PRELOAD shim: the wall clock of one process steps as an NTP step would move it.
 *
 * CLOCK_REALTIME (and its coarse variant, gettimeofday, time) read the true time plus an
 * offset in whole seconds, read from the file named by WALL_CLOCK_OFFSET_FILE (re-read at
 * most every 20 ms). Monotonic clocks and sleeps are left alone, as an NTP step leaves them.
 * Debian's libfaketime 0.9.10 cannot do this for Python 3.11: with the monotonic clock
 * excluded, its clock_nanosleep passes a negative time and time.sleep fails with EINVAL
 * (wolfcw/libfaketime#426).
 *
 * Built by tests/e2e/test_faults.py: cc -shared -fPIC -O2 -o lib.so wall_clock_step.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime(void) {
    static clock_gettime_fn fn;
    if (!fn) fn = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    return fn;
}

static long offset_s(void) {
    static long offset, next_read_ns;
    struct timespec mono;
    real_clock_gettime()(CLOCK_MONOTONIC, &mono);
    long now_ns = mono.tv_sec * 1000000000L + mono.tv_nsec;
    if (now_ns >= __atomic_load_n(&next_read_ns, __ATOMIC_RELAXED)) {
        const char *path = getenv("WALL_CLOCK_OFFSET_FILE");
        FILE *f = path ? fopen(path, "r") : NULL;
        long value;
        if (f) {
            if (fscanf(f, "%ld", &value) == 1) __atomic_store_n(&offset, value, __ATOMIC_RELAXED);
            fclose(f);
        }
        __atomic_store_n(&next_read_ns, now_ns + 20000000L, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&offset, __ATOMIC_RELAXED);
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    int rc = real_clock_gettime()(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        ts->tv_sec += offset_s();
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    (void)tz;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
