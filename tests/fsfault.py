"""A real-process fault injector for the file system calls the native writer makes.

The shim is C, compiled by the test with gcc and loaded with ``LD_PRELOAD`` into a
child Python: the writer runs unchanged against a real file, and the kernel's
answer is replaced only where the test says so. Environment variables:

- ``FSFAULT_EIO``: a file holding a count N; while N > 0, fsync/fdatasync of a
  regular file fails with EIO and, like the kernel after failed writeback
  ("fsyncgate"), the bytes written since that file's last successful sync are
  lost: they read back as zeros. N is decremented (the file removed at 0).
- ``FSFAULT_SLEEP_MS``: every fsync/fdatasync of a regular file sleeps first.
- ``FSFAULT_ENOSPC``: while this file exists, write(2) to a regular file under
  ``FSFAULT_PREFIX`` fails with ENOSPC (a full disk, for when tmpfs cannot be
  mounted).
- ``FSFAULT_LOG``: one line per fsync/fdatasync: ``<call> <dir|file|other> <rc> <path>``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

struct synced { dev_t dev; ino_t ino; off_t size; };
static struct synced table[1024];
static int entries;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static void init(void) {
    if (!real_write) real_write = dlsym(RTLD_NEXT, "write");
    if (!real_fsync) real_fsync = dlsym(RTLD_NEXT, "fsync");
    if (!real_fdatasync) real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
}

static struct synced *slot(const struct stat *st) {
    for (int i = 0; i < entries; i++)
        if (table[i].dev == st->st_dev && table[i].ino == st->st_ino) return &table[i];
    if (entries == 1024) return NULL;
    table[entries].dev = st->st_dev;
    table[entries].ino = st->st_ino;
    table[entries].size = 0;
    return &table[entries++];
}

static void fd_path(int fd, char *out, size_t cap) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, cap - 1);
    out[n < 0 ? 0 : n] = 0;
}

static void log_call(const char *call, int fd, const struct stat *st, int rc) {
    const char *log = getenv("FSFAULT_LOG");
    if (!log) return;
    char path[4096], line[4300];
    fd_path(fd, path, sizeof path);
    const char *kind = S_ISDIR(st->st_mode) ? "dir" : S_ISREG(st->st_mode) ? "file" : "other";
    int len = snprintf(line, sizeof line, "%s %s %d %s\n", call, kind, rc, path);
    int lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (lfd >= 0) {
        real_write(lfd, line, len);
        close(lfd);
    }
}

/* Take one failure from the counter file; 1 if this call must fail. */
static int take_failure(void) {
    const char *trigger = getenv("FSFAULT_EIO");
    if (!trigger) return 0;
    int fd = open(trigger, O_RDWR | O_CLOEXEC);
    if (fd < 0) return 0;
    char buf[32] = {0};
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    long left = n > 0 ? strtol(buf, NULL, 10) : 1;
    if (left <= 1) {
        close(fd);
        unlink(trigger);
        return left >= 1;
    }
    int len = snprintf(buf, sizeof buf, "%ld\n", left - 1);
    if (ftruncate(fd, 0) == 0) pwrite(fd, buf, len, 0);
    close(fd);
    return 1;
}

/* The pages written since the last good sync are gone: they read back as zeros.
   A separate descriptor, because pwrite on an O_APPEND one appends. */
static void lose_unsynced(int fd, const struct stat *st, off_t from) {
    char path[4096];
    fd_path(fd, path, sizeof path);
    int w = open(path, O_WRONLY | O_CLOEXEC);
    if (w < 0) return;
    static const char zeros[4096];
    for (off_t at = from; at < st->st_size;) {
        size_t chunk = st->st_size - at < 4096 ? (size_t)(st->st_size - at) : 4096;
        ssize_t n = pwrite(w, zeros, chunk, at);
        if (n <= 0) break;
        at += n;
    }
    close(w);
}

static int faulty_sync(int fd, const char *call, int (*real)(int)) {
    init();
    struct stat st;
    if (fstat(fd, &st) != 0) return real(fd);
    if (S_ISREG(st.st_mode)) {
        const char *ms = getenv("FSFAULT_SLEEP_MS");
        if (ms) usleep((useconds_t)atoi(ms) * 1000);
        pthread_mutex_lock(&mu);
        struct synced *s = slot(&st);
        if (take_failure()) {
            lose_unsynced(fd, &st, s ? s->size : 0);
            pthread_mutex_unlock(&mu);
            log_call(call, fd, &st, -1);
            errno = EIO;
            return -1;
        }
        pthread_mutex_unlock(&mu);
    }
    int rc = real(fd);
    int saved = errno;
    if (rc == 0 && S_ISREG(st.st_mode) && fstat(fd, &st) == 0) {
        pthread_mutex_lock(&mu);
        struct synced *s = slot(&st);
        if (s) s->size = st.st_size;
        pthread_mutex_unlock(&mu);
    }
    log_call(call, fd, &st, rc);
    errno = saved;
    return rc;
}

int fsync(int fd) { init(); return faulty_sync(fd, "fsync", real_fsync); }
int fdatasync(int fd) { init(); return faulty_sync(fd, "fdatasync", real_fdatasync); }

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    const char *full = getenv("FSFAULT_ENOSPC");
    const char *prefix = getenv("FSFAULT_PREFIX");
    if (full && prefix && access(full, F_OK) == 0) {
        struct stat st;
        char path[4096];
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
            fd_path(fd, path, sizeof path);
            if (strncmp(path, prefix, strlen(prefix)) == 0) {
                errno = ENOSPC;
                return -1;
            }
        }
    }
    return real_write(fd, buf, n);
}
"""


def build_shim() -> Path:
    """Compile the shim once per source version; return the shared object's path."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"sigil-fsfault-{os.getuid()}"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    lib = out_dir / f"libfsfault-{digest}.so"
    if not lib.exists():
        src = out_dir / f"fsfault-{digest}.c"
        src.write_text(SOURCE)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O1", "-o", str(tmp), str(src), "-ldl", "-lpthread"],
            check=True,
            capture_output=True,
        )
        tmp.replace(lib)
    return lib


def run_faulty(
    script: str, *args: object, timeout: float = 60, check: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a Python script with the shim preloaded and ``FSFAULT_*`` settings from ``env``."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FSFAULT_")}
    child_env["LD_PRELOAD"] = str(build_shim())
    child_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=child_env,
    )
    if check:
        assert proc.returncode == 0, (
            f"subprocess exited {proc.returncode}\n--stdout--\n{proc.stdout}\n"
            f"--stderr--\n{proc.stderr}"
        )
    return proc
