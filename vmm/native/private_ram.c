/* Preloaded into a jailed QEMU that maps its guest RAM private (copy-on-write) from a template.
 *
 * QEMU 7.2 opens such a file read-write even though no write ever reaches it; QEMU 8.1 falls
 * back to read-only when read-write is refused. This is that fallback for 7.2: the one file
 * named in MVM_PRIVATE_RAM is opened read-only, so the template's RAM file can stay read-only
 * (and its mount too) for every clone. Every other open passes through untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef int (*open_fn)(const char *, int, ...);
typedef int (*open2_fn)(const char *, int);

static int private_ram_flags(const char *path, int flags)
{
    const char *ram = getenv("MVM_PRIVATE_RAM");
    if (ram != NULL && path != NULL && strcmp(path, ram) == 0 && (flags & O_ACCMODE) == O_RDWR)
        return (flags & ~O_ACCMODE) | O_RDONLY;
    return flags;
}

static mode_t mode_of(int flags, va_list ap)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

#define PASS_THROUGH(name)                                                  \
    int name(const char *path, int flags, ...)                              \
    {                                                                       \
        static open_fn real;                                                \
        va_list ap;                                                         \
        mode_t mode;                                                        \
        if (real == NULL)                                                   \
            real = (open_fn)dlsym(RTLD_NEXT, #name);                        \
        va_start(ap, flags);                                                \
        mode = mode_of(flags, ap);                                          \
        va_end(ap);                                                         \
        return real(path, private_ram_flags(path, flags), mode);           \
    }

#define PASS_THROUGH_2(name)                                                \
    int name(const char *path, int flags)                                   \
    {                                                                       \
        static open2_fn real;                                               \
        if (real == NULL)                                                   \
            real = (open2_fn)dlsym(RTLD_NEXT, #name);                       \
        return real(path, private_ram_flags(path, flags));                  \
    }

PASS_THROUGH(open)
PASS_THROUGH(open64)
PASS_THROUGH_2(__open_2)
PASS_THROUGH_2(__open64_2)
