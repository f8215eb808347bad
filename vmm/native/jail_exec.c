/* mvm-jail-exec: the steps a QEMU takes between spawn and exec (vmm/confine.py builds its argv).
 *
 * Started with posix_spawn (vfork: no copy of the manager's page tables), it enters the VM's
 * network namespace and cgroups, builds a mount namespace whose root is a tmpfs holding only
 * the given binds, pivots into it, drops to the VM's uid/gid with no capabilities and
 * no_new_privs, closes every descriptor but the kept ones, and execs QEMU. Any failure is one
 * line on stderr (the VM's qemu.log) and exit status 127.
 *
 * Each --cgroup file is a group's join file (v1: `tasks`, v2: `cgroup.procs`); "0" written to it moves
 * the writer. This process has one thread, so v1's per-thread `tasks` moves all of it without the
 * kernel's global threadgroup lock, whose RCU grace period a busy host makes last milliseconds.
 *
 * argv: --netns PATH  [--cgroup JOIN_FILE]...  [--keep-fd N]...  [--env NAME=VALUE]...
 *       [--jail UID GID ROOT CWD  [--group GID]...  [--bind SRC DST FLAGS IS_FILE]...
 *        [--symlink NAME TARGET]...]  -- QEMU ARGV...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_ITEMS 64
#define PROC_OPTIONS "hidepid=invisible,subset=pid"

struct bind { const char *src, *dst; unsigned long flags; int is_file; };

static void die(const char *what, const char *arg)
{
    fprintf(stderr, "microvm-edge jail: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    _exit(127);
}

static void check(int result, const char *what, const char *arg)
{
    if (result != 0)
        die(what, arg);
}

static void mkdirs(char *path, mode_t mode)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, mode) != 0 && errno != EEXIST)
            die("mkdir", path);
        *p = '/';
    }
    if (mkdir(path, mode) != 0 && errno != EEXIST)
        die("mkdir", path);
}

static void in_root(char *out, const char *root, const char *path)
{
    if (snprintf(out, PATH_MAX, "%s%s", root, path) >= PATH_MAX) {
        errno = ENAMETOOLONG;
        die("path", path);
    }
}

static void write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, data, strlen(data)) < 0)
        die("write", path);
    close(fd);
}

int main(int argc, char **argv)
{
    const char *netns = NULL, *root = NULL, *cwd = NULL, *cgroups[MAX_ITEMS];
    const char *links[MAX_ITEMS][2];
    struct bind binds[MAX_ITEMS];
    int keep[MAX_ITEMS], ncg = 0, nkeep = 0, nbind = 0, nlink = 0, ngroups = 0, jailed = 0, i;
    gid_t groups[MAX_ITEMS], gid = 0;
    uid_t uid = 0;
    char path[PATH_MAX];

    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *opt = argv[i];
        int left = argc - i - 1;
        if (!strcmp(opt, "--netns") && left >= 1) {
            netns = argv[++i];
        } else if (!strcmp(opt, "--cgroup") && left >= 1 && ncg < MAX_ITEMS) {
            cgroups[ncg++] = argv[++i];
        } else if (!strcmp(opt, "--keep-fd") && left >= 1 && nkeep < MAX_ITEMS) {
            keep[nkeep++] = atoi(argv[++i]);
        } else if (!strcmp(opt, "--env") && left >= 1) {
            i++;
            check(putenv(argv[i]), "putenv", argv[i]);
        } else if (!strcmp(opt, "--jail") && left >= 4) {
            jailed = 1;
            uid = (uid_t)strtoul(argv[i + 1], NULL, 10);
            gid = (gid_t)strtoul(argv[i + 2], NULL, 10);
            root = argv[i + 3];
            cwd = argv[i + 4];
            i += 4;
        } else if (!strcmp(opt, "--group") && left >= 1 && ngroups < MAX_ITEMS) {
            groups[ngroups++] = (gid_t)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(opt, "--bind") && left >= 4 && nbind < MAX_ITEMS) {
            binds[nbind].src = argv[i + 1];
            binds[nbind].dst = argv[i + 2];
            binds[nbind].flags = strtoul(argv[i + 3], NULL, 10);
            binds[nbind].is_file = atoi(argv[i + 4]);
            nbind++;
            i += 4;
        } else if (!strcmp(opt, "--symlink") && left >= 2 && nlink < MAX_ITEMS) {
            links[nlink][0] = argv[i + 1];
            links[nlink][1] = argv[i + 2];
            nlink++;
            i += 2;
        } else {
            errno = EINVAL;
            die("bad argument", opt);
        }
    }
    if (i + 1 >= argc || netns == NULL) {
        errno = EINVAL;
        die("usage: mvm-jail-exec --netns PATH [...] -- QEMU ARGV", NULL);
    }
    char **qemu = argv + i + 1;

    int ns = open(netns, O_RDONLY | O_CLOEXEC);
    if (ns < 0)
        die("open", netns);
    check(setns(ns, CLONE_NEWNET), "setns", netns);
    close(ns);
    for (int c = 0; c < ncg; c++)
        write_file(cgroups[c], "0");

    if (jailed) {
        check(unshare(CLONE_NEWNS), "unshare", "CLONE_NEWNS");
        check(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), "mount --make-rprivate", "/");
        check(mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=256"), "mount tmpfs",
              root);
        for (int l = 0; l < nlink; l++) {
            in_root(path, root, "/");
            strncat(path, links[l][0], PATH_MAX - strlen(path) - 1);
            check(symlink(links[l][1], path), "symlink", path);
        }
        for (int b = 0; b < nbind; b++) {
            in_root(path, root, binds[b].dst);
            if (binds[b].is_file) {
                char *slash = strrchr(path, '/');
                *slash = '\0';
                mkdirs(path, 0755);
                *slash = '/';
                int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
                if (fd < 0)
                    die("create", path);
                close(fd);
            } else {
                mkdirs(path, 0755);
            }
            check(mount(binds[b].src, path, NULL, MS_BIND | MS_REC, NULL), "bind", binds[b].src);
            check(mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | binds[b].flags, NULL), "remount", path);
        }
        in_root(path, root, "/proc");
        mkdirs(path, 0555);
        check(mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTIONS), "mount proc", path);
        in_root(path, root, cwd);
        mkdirs(path, 0755);
        in_root(path, root, "/.old");
        check(mkdir(path, 0700), "mkdir", path);
        check((int)syscall(SYS_pivot_root, root, path), "pivot_root", root);
        check(chdir("/"), "chdir", "/");
        check(umount2("/.old", MNT_DETACH), "umount", "the host's root");
        check(rmdir("/.old"), "rmdir", "/.old");
        check(mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL), "remount", "/");
        check(chdir(cwd), "chdir", cwd);

        check(setgroups((size_t)ngroups, groups), "setgroups", NULL);
        check(setresgid(gid, gid, gid), "setresgid", NULL);
        for (int cap = 0; cap <= 63; cap++)
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);  /* past the kernel's last capability: EINVAL, harmless */
        check(setresuid(uid, uid, uid), "setresuid", NULL);  /* clears every permitted and effective capability */
        check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl", "PR_SET_NO_NEW_PRIVS");
        umask(077);
    }

    /* Every descriptor but stdio and the kept ones (the tap) is closed: nothing of the manager's leaks in. */
    int low = 3;
    for (;;) {
        int next = INT_MAX;
        for (int k = 0; k < nkeep; k++)
            if (keep[k] >= low && keep[k] < next)
                next = keep[k];
        if (next > low)
            syscall(SYS_close_range, low, next == INT_MAX ? ~0U : (unsigned)next - 1, 0);
        if (next == INT_MAX)
            break;
        low = next + 1;
    }
    execvp(qemu[0], qemu);
    die("exec", qemu[0]);
    return 127;
}
