/*
 * File tools the host runs through the agent's exec as `/mvm/init <tool> PATH`: every image
 * has /mvm/init, not every image has cat, ls or a shell. Data goes over the exec's stdin and
 * stdout, so any size streams; errors are a message on stderr and errno as the exit status.
 *
 *   file-get PATH     stdout: "F" then the file's bytes, or "D" then one JSON object per entry
 *   file-put PATH     stdin -> an unnamed file beside PATH, fsync, name, rename: readers never see half,
 *                     and an upload cut short leaves no file behind
 *   file-delete PATH  a file, or an empty directory
 *
 * When stdout (file-get) or stdin (file-put) is a pipe, as the agent gives them, the bytes move
 * between it and the file by splice(): no copy through this process (under TCG every copy is
 * emulated). Anything else (a terminal, a file) is read and written.
 */
#define _GNU_SOURCE
#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SPLICE_BYTES (1 << 20)

static int fail(const char *what, const char *path) {
    int err = errno ? errno : EIO;
    fprintf(stderr, "%s %s: %s\n", what, path, strerror(err));
    return err;
}

static int write_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += w, n -= (size_t)w;
    }
    return 0;
}

/* Everything from `from` to `to` until EOF: spliced if one of them is a pipe, else read and written. */
static int move_all(int from, int to) {
    ssize_t n;
    while ((n = splice(from, NULL, to, NULL, SPLICE_BYTES, SPLICE_F_MOVE)) > 0)
        ;
    if (n == 0 || errno != EINVAL)
        return n == 0 ? 0 : -1;
    static char buf[65536];
    while ((n = read(from, buf, sizeof buf)) > 0)
        if (write_all(to, buf, (size_t)n) != 0)
            return -1;
    return n == 0 ? 0 : -1;
}

static void json_string(FILE *out, const char *s) {
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(out, "\\u%04x", *p);
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

static int list_dir(const char *path) {
    DIR *dir = opendir(path);
    if (!dir)
        return fail("cannot list", path);
    fputc('D', stdout);
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(dirfd(dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        const char *type = S_ISDIR(st.st_mode) ? "dir" : S_ISREG(st.st_mode) ? "file" : S_ISLNK(st.st_mode) ? "link" : "other";
        fputs("{\"name\":", stdout);
        json_string(stdout, e->d_name);
        printf(",\"type\":\"%s\",\"size\":%lld,\"mode\":\"%04o\",\"mtime\":%lld.%09ld}\n", type, (long long)st.st_size,
               (unsigned)(st.st_mode & 07777), (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    }
    closedir(dir);
    return fflush(stdout) == 0 ? 0 : fail("cannot write the listing of", path);
}

static int get(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("cannot open", path);
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fail("cannot stat", path);
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return list_dir(path);
    }
    if (write_all(1, "F", 1) != 0)
        return fail("cannot send", path);
    return move_all(fd, 1) == 0 ? 0 : fail("cannot read", path);
}

static void make_parents(char *path) {
    for (char *p = path + 1; (p = strchr(p, '/')); p++) {
        *p = '\0';
        mkdir(path, 0755);
        *p = '/';
    }
}

/*
 * The body goes into an unnamed file (O_TMPFILE) in PATH's directory, so an upload that ends
 * early (the process killed, the agent or the VM gone) leaves nothing behind. Once it is
 * complete and fsynced it gets a temporary name and is renamed over PATH at once. A filesystem
 * without O_TMPFILE gets a named temporary file from the start, removed on every error.
 */
/* An unnamed regular file in the directory of PATH (`dir` is a copy of PATH that this cuts). */
static int open_unnamed(char *dir) {
    char *slash = strrchr(dir, '/');
    slash[slash == dir] = '\0';
    return open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
}

/* Give the unnamed file `fd` a free name, `prefix` + pid + a try count, written into `name`. */
static int name_it(int fd, const char *prefix, char *name, size_t size) {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    for (int tries = 0; tries < 100; tries++) {
        snprintf(name, size, "%s%d-%d", prefix, (int)getpid(), tries);
        int ok = linkat(fd, "", AT_FDCWD, name, AT_EMPTY_PATH);
        if (ok != 0 && errno != EEXIST)  /* AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH: go through /proc */
            ok = linkat(AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW);
        if (ok == 0)
            return 0;
        if (errno != EEXIST)
            return -1;
    }
    return -1;
}

/*
 * The body goes into an unnamed file (O_TMPFILE) beside PATH, so an upload that ends early
 * (this process killed, the agent or the VM gone) leaves nothing behind. Once complete and
 * fsynced it gets a temporary name and is renamed over PATH at once. A filesystem without
 * O_TMPFILE gets a named temporary file from the start, removed on every error here.
 */
static int put(const char *path) {
    char *copy = strdup(path), prefix[4096], tmp[4200];
    make_parents(copy);
    strcpy(copy, path);
    int fd = open_unnamed(copy);
    free(copy);
    int unnamed = fd >= 0;
    snprintf(prefix, sizeof prefix, "%s.mvm-upload-", path);
    if (!unnamed) {
        snprintf(tmp, sizeof tmp, "%sXXXXXX", prefix);
        fd = mkstemp(tmp);
        if (fd < 0)
            return fail("cannot create a temporary file for", path);
    }
    fchmod(fd, 0644);
    if (move_all(0, fd) != 0) {
        int err = fail("cannot write", path);
        close(fd);
        if (!unnamed)
            unlink(tmp);
        return err;
    }
    if (fsync(fd) != 0 || (unnamed && name_it(fd, prefix, tmp, sizeof tmp) != 0)) {
        int err = fail("cannot finish writing", path);
        close(fd);
        if (!unnamed)
            unlink(tmp);
        return err;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        int err = fail("cannot finish writing", path);
        unlink(tmp);
        return err;
    }
    return 0;
}

static int delete(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0)
        return fail("cannot delete", path);
    if ((S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path)) != 0)
        return fail("cannot delete", path);
    return 0;
}

int files_tool(const char *tool, const char *path) {
    errno = 0;
    if (path[0] != '/') {
        fprintf(stderr, "%s: the path must be absolute: %s\n", tool, path);
        return EINVAL;
    }
    if (!strcmp(tool, "file-get"))
        return get(path);
    if (!strcmp(tool, "file-put"))
        return put(path);
    if (!strcmp(tool, "file-delete"))
        return delete(path);
    fprintf(stderr, "unknown tool %s\n", tool);
    return EINVAL;
}
