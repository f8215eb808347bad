/*
 * mvm-init: PID 1 of every disk image, injected at /mvm/init.
 *
 * Written in C because gcc and static glibc are already a build dependency of the
 * project (the demo app is C): no toolchain download, one small static binary that
 * needs nothing from the image it runs in.
 *
 * It mounts the kernel filesystems, sets the hostname, configures lo and eth0 from the
 * kernel command line (mvm.ip=, mvm.gw=, mvm.hostname=), starts the image's command as
 * /mvm/config says (argv, env, cwd, uid/gid, whether the agent's execs keep ASLR; plus
 * HTTP(S)_PROXY naming the host's egress proxy, see agent.h), sends the app's stdout and stderr to the host through a virtio
 * console (/dev/hvc0), reaps every zombie, forwards SIGTERM for a clean stop, and powers the VM off when the app ends so the host sees it. It also keeps
 * the guest agent (agent.c) running, restarting it if it dies.
 */
#define _GNU_SOURCE
#include "agent.h"
#include "files.h"
#include "hooks.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 1024
#define CONFIG_PATH "/mvm/config"
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static int log_fd = 2;

struct config {
    char *argv[MAX_ITEMS + 1];
    int argc;
    char *env[MAX_ITEMS + 4 + PROXY_ENV_COUNT]; /* + PATH, HOME, HOSTNAME, the proxy settings and the NULL */
    int envc;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups;
    const char *hostname;
    int ports[64];
    int nports;
    int stop_timeout;
};

static void say(const char *fmt, ...) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "mvm-init: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    if (write(log_fd, buf, (size_t)n) < 0) { /* nowhere else to say it */
    }
}

static void power_off(void) {
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause(); /* reboot() only returns on error; PID 1 must never exit */
}

/* ---------------------------------------------------------------- mounts */

static int is_mounted(const char *path) {
    struct stat here, parent;
    char up[256];
    snprintf(up, sizeof up, "%s/..", path);
    if (stat(path, &here) != 0 || stat(up, &parent) != 0)
        return 0;
    return here.st_dev != parent.st_dev;
}

static void mount_fs(const char *type, const char *target, unsigned long flags, const char *data, mode_t mode) {
    mkdir(target, mode);
    if (is_mounted(target))
        return;
    if (mount(type, target, type, flags, data) != 0 && strcmp(type, "cgroup2") != 0)
        say("mount %s on %s: %s", type, target, strerror(errno));
}

static void setup_mounts(void) {
    mount(NULL, "/", NULL, MS_REMOUNT | MS_NOATIME, NULL); /* read-write, reads stay reads */
    mount_fs("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555);
    mount_fs("sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555);
    mount_fs("devtmpfs", "/dev", MS_NOSUID, "mode=0755", 0755);
    mount_fs("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666", 0755);
    mount_fs("tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV, "mode=1777", 01777);
    mount_fs("tmpfs", "/run", MS_NOSUID | MS_NODEV, "mode=0755", 0755);
    mount_fs("tmpfs", "/tmp", MS_NOSUID | MS_NODEV, "mode=1777", 01777);
    mount_fs("cgroup2", "/sys/fs/cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555);
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");
    if (access("/dev/ptmx", F_OK) != 0)
        symlink("pts/ptmx", "/dev/ptmx");
}

/* ---------------------------------------------------------------- log channel */

static void open_log(void) {
    const char *paths[] = {"/dev/hvc0", "/dev/console"};
    for (int i = 0; i < 2; i++) {
        int fd = open(paths[i], O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct termios t;
        if (tcgetattr(fd, &t) == 0) { /* raw: bytes reach the host unchanged (no \r added) */
            cfmakeraw(&t);
            tcsetattr(fd, TCSANOW, &t);
        }
        log_fd = fd;
        return;
    }
}

/* ---------------------------------------------------------------- config */

static char *read_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 1 >= cap)
            buf = realloc(buf, cap *= 2);
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    return buf;
}

static void parse_config(struct config *c, char *text) {
    char *lines, *gs; /* strtok_r: `groups` splits its value while the lines are being split */
    for (char *line = strtok_r(text, "\n", &lines); line; line = strtok_r(NULL, "\n", &lines)) {
        char *value = strchr(line, ' ');
        if (!value) {
            say("config: ignoring line without a value: %s", line);
            continue;
        }
        *value++ = '\0';
        if (!strcmp(line, "arg") && c->argc < MAX_ITEMS)
            c->argv[c->argc++] = value;
        else if (!strcmp(line, "env") && c->envc < MAX_ITEMS)
            c->env[c->envc++] = value;
        else if (!strcmp(line, "cwd"))
            c->cwd = value;
        else if (!strcmp(line, "uid"))
            c->uid = (uid_t)strtoul(value, NULL, 10);
        else if (!strcmp(line, "gid"))
            c->gid = (gid_t)strtoul(value, NULL, 10);
        else if (!strcmp(line, "groups")) {
            for (char *g = strtok_r(value, ",", &gs); g && c->ngroups < 64; g = strtok_r(NULL, ",", &gs))
                c->groups[c->ngroups++] = (gid_t)strtoul(g, NULL, 10);
        } else if (!strcmp(line, "hostname"))
            c->hostname = value;
        else if (!strcmp(line, "port") && c->nports < 64)
            c->ports[c->nports++] = atoi(value);
        else if (!strcmp(line, "stop_timeout"))
            c->stop_timeout = atoi(value);
        else if (!strcmp(line, "exec_aslr"))
            agent_exec_aslr = strcmp(value, "off") != 0;
        else
            say("config: ignoring unknown key %s", line);
    }
}

/* mvm.<key>=value from the kernel command line, or NULL */
static const char *cmdline_value(const char *cmdline, const char *key, char *out, size_t size) {
    size_t klen = strlen(key);
    for (const char *p = cmdline; p && *p;) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, klen) && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t n = strcspn(v, " \n");
            if (n >= size)
                n = size - 1;
            memcpy(out, v, n);
            out[n] = '\0';
            return out;
        }
        p = strchr(p, ' ');
    }
    return NULL;
}

/* ---------------------------------------------------------------- network */

static int set_addr(int s, const char *ifname, unsigned long request, in_addr_t addr) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = addr;
    return ioctl(s, request, &ifr);
}

static int link_up(int s, const char *ifname) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
        return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static void setup_network(const char *cmdline) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        say("socket: %s", strerror(errno));
        return;
    }
    if (link_up(s, "lo") != 0)
        say("lo up: %s", strerror(errno));
    char ip[64], gw[64];
    if (!cmdline_value(cmdline, "mvm.ip", ip, sizeof ip)) {
        say("no mvm.ip= on the kernel command line: eth0 stays down");
        close(s);
        return;
    }
    char *slash = strchr(ip, '/');
    int prefix = slash ? atoi(slash + 1) : 24;
    if (slash)
        *slash = '\0';
    struct in_addr addr;
    if (inet_pton(AF_INET, ip, &addr) != 1 || prefix < 0 || prefix > 32) {
        say("bad mvm.ip=%s", ip);
        close(s);
        return;
    }
    for (int i = 0; i < 500 && access("/sys/class/net/eth0", F_OK) != 0; i++)
        usleep(10000); /* virtio-net probes asynchronously */
    in_addr_t mask = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
    if (set_addr(s, "eth0", SIOCSIFADDR, addr.s_addr) != 0 || set_addr(s, "eth0", SIOCSIFNETMASK, mask) != 0 ||
        link_up(s, "eth0") != 0) {
        say("configuring eth0: %s", strerror(errno));
        close(s);
        return;
    }
    struct in_addr gateway;
    if (cmdline_value(cmdline, "mvm.gw", gw, sizeof gw) && inet_pton(AF_INET, gw, &gateway) == 1) {
        struct rtentry route;
        memset(&route, 0, sizeof route);
        struct sockaddr_in *dst = (struct sockaddr_in *)&route.rt_dst;
        struct sockaddr_in *via = (struct sockaddr_in *)&route.rt_gateway;
        struct sockaddr_in *msk = (struct sockaddr_in *)&route.rt_genmask;
        dst->sin_family = via->sin_family = msk->sin_family = AF_INET;
        via->sin_addr = gateway;
        route.rt_flags = RTF_UP | RTF_GATEWAY;
        route.rt_dev = "eth0";
        if (ioctl(s, SIOCADDRT, &route) != 0 && errno != EEXIST)
            say("default route via %s: %s", gw, strerror(errno));
    }
    close(s);
}

/* ---------------------------------------------------------------- the app */

static const char *env_get(struct config *c, const char *key) {
    size_t klen = strlen(key);
    for (int i = 0; i < c->envc; i++)
        if (!strncmp(c->env[i], key, klen) && c->env[i][klen] == '=')
            return c->env[i] + klen + 1;
    return NULL;
}

/* the user's home from the image's /etc/passwd (read by hand: static glibc has no NSS) */
static void home_of(uid_t uid, char *out, size_t size) {
    snprintf(out, size, "HOME=/");
    char *text = read_file("/etc/passwd");
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n")) {
        char *field[7] = {0};
        int n = 0;
        for (char *p = line; n < 7; p++) {
            field[n++] = p;
            p = strchr(p, ':');
            if (!p)
                break;
            *p = '\0';
        }
        if (n == 7 && (uid_t)strtoul(field[2], NULL, 10) == uid && *field[5]) {
            snprintf(out, size, "HOME=%s", field[5]);
            break;
        }
    }
    free(text);
}

static void complete_env(struct config *c) {
    static char home[512], host[300];
    if (!env_get(c, "PATH"))
        c->env[c->envc++] = DEFAULT_PATH;
    if (!env_get(c, "HOME")) {
        home_of(c->uid, home, sizeof home);
        c->env[c->envc++] = home;
    }
    if (!env_get(c, "HOSTNAME")) {
        snprintf(host, sizeof host, "HOSTNAME=%s", c->hostname);
        c->env[c->envc++] = host;
    }
    for (int i = 0; i < PROXY_ENV_COUNT; i++) { /* see agent.h */
        char name[32];
        snprintf(name, sizeof name, "%.*s", (int)strcspn(proxy_env[i], "="), proxy_env[i]);
        const char *value = env_get(c, name);
        if (!value) {
            c->env[c->envc++] = (char *)proxy_env[i];
            value = strchr(proxy_env[i], '=') + 1;
        }
        setenv(name, value, 1); /* for the agent, forked after this, to give execs the same */
    }
    c->env[c->envc] = NULL;
}

/* argv[0] through the app's PATH, like execvp but with the app's env, not ours */
static void exec_app(struct config *c) {
    const char *file = c->argv[0];
    if (strchr(file, '/')) {
        execve(file, c->argv, c->env);
        return;
    }
    const char *path = env_get(c, "PATH");
    int saved = ENOENT;
    for (const char *p = path; p && *p;) {
        size_t n = strcspn(p, ":");
        char full[4096];
        snprintf(full, sizeof full, "%.*s/%s", (int)n, p, file);
        execve(full, c->argv, c->env);
        if (errno != ENOENT)
            saved = errno;
        p += n + (p[n] == ':');
    }
    errno = saved;
}

static pid_t start_app(struct config *c, sigset_t *blocked) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    sigprocmask(SIG_UNBLOCK, blocked, NULL);
    setsid();
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    if (null > 2)
        close(null); /* the app gets fds 0-2 and nothing else of ours */
    if (setgroups((size_t)c->ngroups, c->groups) != 0 || setgid(c->gid) != 0 || setuid(c->uid) != 0) {
        say("cannot switch to uid %u gid %u: %s", c->uid, c->gid, strerror(errno));
        _exit(126);
    }
    if (chdir(c->cwd) != 0) {
        say("cannot enter working directory %s: %s", c->cwd, strerror(errno));
        _exit(126);
    }
    exec_app(c);
    int err = errno;
    say("cannot exec %s: %s", c->argv[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

/* ports in LISTEN state in /proc/net/tcp{,6}: the app is up */
static int listening(struct config *c) {
    const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    for (int i = 0; i < c->nports; i++) {
        int found = 0;
        char want[16];
        snprintf(want, sizeof want, ":%04X ", c->ports[i]);
        for (int f = 0; f < 2 && !found; f++) {
            char *text = read_file(files[f]);
            if (!text)
                continue;
            for (char *line = strtok(text, "\n"); line && !found; line = strtok(NULL, "\n")) {
                char *local = strchr(line, ':');
                local = local ? strchr(local + 1, ':') : NULL; /* the local address's port */
                if (local && !strncmp(local, want, strlen(want)) && strstr(local, " 0A "))
                    found = 1;
            }
            free(text);
        }
        if (!found)
            return 0;
    }
    return 1;
}

/* The agent in its own process, so that a crash in it is a restart, not a kernel panic. */
static pid_t start_agent(sigset_t *blocked, int restarts) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    sigprocmask(SIG_UNBLOCK, blocked, NULL);
    if (restarts > 3)
        sleep(1); /* crashing in a loop: do not spin */
    agent_main();
    _exit(1);
}

static void describe(pid_t pid, int status) {
    const char *name = WIFSIGNALED(status) ? sigabbrev_np(WTERMSIG(status)) : NULL; /* "TERM"; NULL for RT signals */
    if (WIFEXITED(status))
        say("app (pid %d) exited with status %d", pid, WEXITSTATUS(status));
    else if (name)
        say("app (pid %d) was killed by signal SIG%s", pid, name);
    else if (WIFSIGNALED(status))
        say("app (pid %d) was killed by signal %d", pid, WTERMSIG(status));
}

int main(int argc, char **argv) {
    static struct config c = {.cwd = "/", .hostname = "mvm", .stop_timeout = 10};
    if (getpid() != 1 && argc == 3 && !strncmp(argv[1], "file-", 5))
        return files_tool(argv[1], argv[2]); /* run by the agent's exec: see files.c */
    if (getpid() != 1 && argc == 3 && !strcmp(argv[1], "hooks"))
        return hooks_tool(argv[2]); /* likewise: see hooks.c */
    if (getpid() != 1)
        fprintf(stderr, "mvm-init: not PID 1; running anyway\n");
    setup_mounts();
    open_log();

    char *cmdline = read_file("/proc/cmdline");
    char *text = read_file(CONFIG_PATH);
    if (!text) {
        say("cannot read %s: %s", CONFIG_PATH, strerror(errno));
        power_off();
    }
    parse_config(&c, text);
    static char name[256];
    if (cmdline && cmdline_value(cmdline, "mvm.hostname", name, sizeof name))
        c.hostname = name;
    if (sethostname(c.hostname, strlen(c.hostname)) != 0)
        say("sethostname: %s", strerror(errno));
    setup_network(cmdline ? cmdline : "");
    if (c.argc == 0) {
        say("%s names no command (no arg lines)", CONFIG_PATH);
        power_off();
    }
    c.argv[c.argc] = NULL;
    complete_env(&c);

    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGCHLD);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    int sfd = signalfd(-1, &blocked, SFD_CLOEXEC);

    int agent_restarts = 0;
    pid_t agent = start_agent(&blocked, agent_restarts);
    pid_t app = start_app(&c, &blocked);
    if (app < 0) {
        say("fork: %s", strerror(errno));
        power_off();
    }
    int ready = c.nports == 0;
    struct timespec stop_deadline = {0, 0};
    int sigkilled = 0;
    for (;;) {
        /* wake on a signal, or every 20 ms while waiting for the ports / a stop deadline */
        int waiting = !ready || stop_deadline.tv_sec;
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(sfd, &fds);
        struct timeval tick = {0, 20000};
        int n = select(sfd + 1, &fds, NULL, NULL, waiting ? &tick : NULL);
        if (n > 0) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == sizeof si && (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) &&
                !stop_deadline.tv_sec) {
                say("stopping: SIGTERM to the app, SIGKILL after %d s", c.stop_timeout);
                kill(-app, SIGTERM);
                kill(app, SIGTERM);
                clock_gettime(CLOCK_MONOTONIC, &stop_deadline);
                stop_deadline.tv_sec += c.stop_timeout;
            }
        }
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            if (pid == agent) {
                say("the guest agent (pid %d) ended with status %d: restarting it", pid, status);
                agent = start_agent(&blocked, ++agent_restarts);
            } else if (pid == app) {
                describe(pid, status);
                kill(-app, SIGKILL); /* whatever the app left behind in its session */
                power_off();
            }
        }
        if (!ready && listening(&c)) {
            ready = 1;
            struct timespec up;
            clock_gettime(CLOCK_BOOTTIME, &up);
            char ports[256] = "";
            for (int i = 0; i < c.nports; i++)
                snprintf(ports + strlen(ports), sizeof ports - strlen(ports), "%s%d", i ? "," : "", c.ports[i]);
            say("ready ports=%s uptime=%ld.%02ld", ports, (long)up.tv_sec, up.tv_nsec / 10000000);
        }
        if (stop_deadline.tv_sec) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec >= stop_deadline.tv_sec) {
                if (sigkilled) { /* not reaped even after SIGKILL (stuck in D state): never hang the VM on it */
                    say("the app did not die after SIGKILL: powering off anyway");
                    power_off();
                }
                say("the app did not stop within %d s: SIGKILL", c.stop_timeout);
                kill(-app, SIGKILL);
                kill(app, SIGKILL);
                sigkilled = 1;
                stop_deadline.tv_sec = now.tv_sec + 2; /* 1-2 s for it to die and be reaped */
            }
        }
    }
}
