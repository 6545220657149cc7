// A filesystem that forgets what was not synced, for tests/powerloss.rs.
//
// Loaded with LD_PRELOAD into a node. Before each write to a regular file
// under $PWRLOSS_DIR, it saves the bytes about to be overwritten (and the
// file's size) in an undo journal under $PWRLOSS_JOURNAL, one journal per
// file. A successful fsync or fdatasync of a file makes it durable: its
// journal is dropped. syncfs(fd) drops the journals of every file under the
// directory fd names (a node's data dir lives on its own disk). Nothing else
// is a sync: sync_file_range (sled's flush) is not, nor is close.
//
// The power cut: once the file $PWRLOSS_JOURNAL/CUT exists, each node dies
// (SIGKILL) right after its next write to a tracked file, before it can sync
// it; the test kills the nodes that do not write within a moment. Then it
// replays each
// journal backwards: every file goes back to what its last sync left, and
// files never synced to empty. What this does not model: directory entries
// (a renamed or created file keeps its name), torn sector writes, and files
// named *.log (node logs, kept whole for post-mortems).
//
// Journal format: 'P' u32 len, path bytes (once, first); then per write
// 'W' u64 offset, u64 old_size, u64 n, n old bytes (the part of
// [offset, offset + len) that existed before the write).

#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static __thread int inside; // our own calls are not journaled

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);

#define LOAD(name) real_##name = dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void init(void) {
    LOAD(write);
    LOAD(pwrite);
    LOAD(pwrite64);
    LOAD(writev);
    LOAD(pwritev);
    LOAD(pwritev64);
    LOAD(ftruncate);
    LOAD(ftruncate64);
    LOAD(fsync);
    LOAD(fdatasync);
    LOAD(syncfs);
    LOAD(open);
    LOAD(open64);
    LOAD(openat);
    LOAD(openat64);
}

static const char *root(void) { return getenv("PWRLOSS_DIR"); }
static const char *jdir(void) { return getenv("PWRLOSS_JOURNAL"); }

static int under(const char *path, const char *dir) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == 0);
}

// The path of a regular file under $PWRLOSS_DIR that fd names.
static int tracked(int fd, char *path) {
    const char *r = root();
    struct stat st;
    if (!r || !jdir() || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    // Node logs are not modeled: kept whole for post-mortems.
    size_t len = (size_t)n;
    if (len > 4 && strcmp(path + len - 4, ".log") == 0) return 0;
    return under(path, r);
}

static void journal_name(const char *path, char *out) {
    uint64_t h = 1469598103934665603ULL; // FNV-1a
    for (const char *p = path; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    snprintf(out, PATH_MAX, "%s/%016llx.undo", jdir(), (unsigned long long)h);
}

static void put(int j, const void *b, size_t n) {
    const char *p = b;
    while (n > 0) {
        ssize_t w = real_write(j, p, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) continue;
            abort(); // a journal we cannot write would make the test lie
        }
        p += w;
        n -= (size_t)w;
    }
}

// Saves what [off, off + len) of the file holds now, before a write there.
static void save(const char *path, int fd, uint64_t off, uint64_t len) {
    struct stat st;
    if (fstat(fd, &st) != 0) abort();
    uint64_t old_size = (uint64_t)st.st_size;
    uint64_t have = off < old_size ? (len < old_size - off ? len : old_size - off) : 0;
    char *old = malloc(have ? have : 1);
    if (!old) abort();
    // The descriptor may be write-only: read through our own.
    int r = real_open(path, O_RDONLY | O_CLOEXEC);
    if (r < 0) abort();
    uint64_t got = 0;
    while (got < have) {
        ssize_t n = pread(r, old + got, have - got, (off_t)(off + got));
        if (n <= 0) break;
        got += (uint64_t)n;
    }
    close(r);
    char name[PATH_MAX];
    journal_name(path, name);
    pthread_mutex_lock(&mu);
    int j = real_open(name, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (j < 0) abort();
    struct stat js;
    if (fstat(j, &js) != 0) abort();
    if (js.st_size == 0) {
        uint32_t n = (uint32_t)strlen(path);
        put(j, "P", 1);
        put(j, &n, 4);
        put(j, path, n);
    }
    put(j, "W", 1);
    put(j, &off, 8);
    put(j, &old_size, 8);
    put(j, &got, 8);
    put(j, old, got);
    close(j);
    pthread_mutex_unlock(&mu);
    free(old);
}

// Whether $PWRLOSS_JOURNAL/CUT exists: the power is being cut.
static int cutting(void) {
    char name[PATH_MAX];
    snprintf(name, sizeof name, "%s/CUT", jdir());
    return access(name, F_OK) == 0;
}

// Journals the write about to happen; returns whether the process must die
// right after it (the cut lands between a write and its sync).
static int before_write(int fd, int64_t off, uint64_t len) {
    if (inside) return 0;
    inside = 1;
    int cut = 0;
    char path[PATH_MAX];
    if (tracked(fd, path)) {
        cut = cutting();
        if (off < 0) { // write(2): at the file offset, or the end with O_APPEND
            int fl = fcntl(fd, F_GETFL);
            struct stat st;
            fstat(fd, &st);
            off = (fl & O_APPEND) ? st.st_size : lseek(fd, 0, SEEK_CUR);
        }
        save(path, fd, (uint64_t)off, len);
    }
    inside = 0;
    return cut;
}

static ssize_t after_write(int cut, ssize_t r) {
    if (cut) raise(SIGKILL);
    return r;
}

static void before_truncate(int fd, off_t len) {
    if (inside) return;
    inside = 1;
    char path[PATH_MAX];
    struct stat st;
    if (tracked(fd, path) && fstat(fd, &st) == 0) {
        uint64_t from = (uint64_t)len < (uint64_t)st.st_size ? (uint64_t)len : (uint64_t)st.st_size;
        save(path, fd, from, (uint64_t)st.st_size - from);
    }
    inside = 0;
}

// Drops the journals of `path` (a file) or of every file under it (a dir).
static void durable(const char *path, int whole_dir) {
    char name[PATH_MAX];
    pthread_mutex_lock(&mu);
    if (!whole_dir) {
        journal_name(path, name);
        unlink(name);
    } else {
        DIR *d = opendir(jdir());
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (!strstr(e->d_name, ".undo")) continue;
            snprintf(name, sizeof name, "%s/%s", jdir(), e->d_name);
            int j = real_open(name, O_RDONLY | O_CLOEXEC);
            if (j < 0) continue;
            char tag;
            uint32_t n = 0;
            char p[PATH_MAX] = {0};
            if (read(j, &tag, 1) == 1 && tag == 'P' && read(j, &n, 4) == 4 && n < PATH_MAX &&
                read(j, p, n) == (ssize_t)n && under(p, path))
                unlink(name);
            close(j);
        }
        if (d) closedir(d);
    }
    pthread_mutex_unlock(&mu);
}

static void after_sync(int fd, int whole_fs) {
    if (!jdir() || !root()) return;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX - 1);
    if (n <= 0) return;
    path[n] = 0;
    if (!under(path, root()) && !under(root(), path)) return;
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    if (whole_fs) durable(S_ISDIR(st.st_mode) ? path : root(), 1);
    else if (S_ISREG(st.st_mode)) durable(path, 0);
}

ssize_t write(int fd, const void *b, size_t n) {
    int cut = before_write(fd, -1, n);
    return after_write(cut, real_write(fd, b, n));
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    int cut = before_write(fd, off, n);
    return after_write(cut, real_pwrite(fd, b, n, off));
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    int cut = before_write(fd, off, n);
    return after_write(cut, real_pwrite64(fd, b, n, off));
}
static uint64_t iov_len(const struct iovec *v, int c) {
    uint64_t t = 0;
    for (int i = 0; i < c; i++) t += v[i].iov_len;
    return t;
}
ssize_t writev(int fd, const struct iovec *v, int c) {
    int cut = before_write(fd, -1, iov_len(v, c));
    return after_write(cut, real_writev(fd, v, c));
}
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t off) {
    int cut = before_write(fd, off, iov_len(v, c));
    return after_write(cut, real_pwritev(fd, v, c, off));
}
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t off) {
    int cut = before_write(fd, off, iov_len(v, c));
    return after_write(cut, real_pwritev64(fd, v, c, off));
}
int ftruncate(int fd, off_t len) {
    before_truncate(fd, len);
    return real_ftruncate(fd, len);
}
int ftruncate64(int fd, off_t len) {
    before_truncate(fd, len);
    return real_ftruncate64(fd, len);
}
int fsync(int fd) {
    int r = real_fsync(fd);
    if (r == 0) after_sync(fd, 0);
    return r;
}
int fdatasync(int fd) {
    int r = real_fdatasync(fd);
    if (r == 0) after_sync(fd, 0);
    return r;
}
int syncfs(int fd) {
    int r = real_syncfs(fd);
    if (r == 0) after_sync(fd, 1);
    return r;
}

// O_TRUNC empties a file without a write: save what it held first.
static void before_open(int dirfd, const char *p, int flags) {
    if (!(flags & O_TRUNC) || inside || !root() || !jdir()) return;
    inside = 1;
    int fd = real_openat(dirfd, p, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char path[PATH_MAX];
        struct stat st;
        if (tracked(fd, path) && fstat(fd, &st) == 0 && st.st_size > 0) save(path, fd, 0, (uint64_t)st.st_size);
        close(fd);
    }
    inside = 0;
}

#define MODE_ARG                                                                                   \
    mode_t mode = 0;                                                                               \
    if (flags & (O_CREAT | O_TMPFILE)) {                                                           \
        va_list a;                                                                                 \
        va_start(a, flags);                                                                        \
        mode = va_arg(a, mode_t);                                                                  \
        va_end(a);                                                                                 \
    }

int open(const char *p, int flags, ...) {
    MODE_ARG
    before_open(AT_FDCWD, p, flags);
    return real_open(p, flags, mode);
}
int open64(const char *p, int flags, ...) {
    MODE_ARG
    before_open(AT_FDCWD, p, flags);
    return real_open64(p, flags, mode);
}
int openat(int d, const char *p, int flags, ...) {
    MODE_ARG
    before_open(d, p, flags);
    return real_openat(d, p, flags, mode);
}
int openat64(int d, const char *p, int flags, ...) {
    MODE_ARG
    before_open(d, p, flags);
    return real_openat64(d, p, flags, mode);
}
