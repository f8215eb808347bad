/*
 * The guest agent (see agent.h): restore hygiene (clock, entropy, hostname) and exec.
 *
 * One process, one poll loop, nothing blocking: the port and every pipe are non-blocking,
 * output waits in buffers.
 *
 * While no host is connected (a template booting, a VM whose manager stopped) the port is
 * readable at EOF and hung up at once, every time it is polled. The loop then leaves the port
 * out and sleeps: the port is in O_ASYNC mode, and the kernel sends SIGIO (read through the
 * signalfd) when the host connects or disconnects, so the loop wakes as the host comes back.
 * A host that goes away ends its session: its execs are killed and forgotten and what was
 * queued for it is dropped, so the next host's session starts clean.
 *
 * Under TCG every byte the guest copies costs emulated instructions on the one vCPU (and all of
 * QEMU counts against the VM's CPU quota), so the stream path copies as little as it can: an
 * exec's pipe output goes to the port by splice (see `relay`), else (a terminal, or while other
 * frames wait) it is read straight into the port's queue; the port is read straight into the frame
 * buffer, until it is empty at each wake (it hands out a page per read); stdin goes to its pipe
 * straight from that buffer when the pipe has room; buffers are consumed by moving an offset, not
 * the bytes behind it.
 */
#define _GNU_SOURCE
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <termios.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_EXECS 64
#define READ_CHUNK 65536
#define PIPE_BYTES (256 * 1024) /* an exec's stdout and stdin pipes: fewer, larger reads and writes */
#define RELAY_BYTES (256 * 1024) /* at most one spliced frame's payload */
#define PORT_READ_MAX (1u << 20) /* read the port for at most this much per wake (it hands out a page per read) */
#define HOST_GONE_CHECK_MS 1000 /* no host: look at the port again this often, should a SIGIO be missed */

/* `len` bytes from `data + off`: consuming moves `off`, and the bytes move to the front only to make room. */
struct buffer {
    unsigned char *data;
    size_t off, len, cap;
};

struct exec {
    uint32_t ch;
    pid_t pid;       /* 0: slot free */
    int out, err, in; /* -1 once closed */
    struct buffer stdin_pending;
    int stdin_eof;   /* close stdin once the pending bytes are written */
    int reaped, status;
    int orphaned;    /* its host went away: killed, reaped without a word to anyone */
    int piped;       /* out and err are pipes (not a terminal): they can be spliced */
};

const char *const proxy_env[PROXY_ENV_COUNT] = {
    "HTTP_PROXY=" PROXY_URL, "HTTPS_PROXY=" PROXY_URL, "NO_PROXY=" NO_PROXY_HOSTS,
    "http_proxy=" PROXY_URL, "https_proxy=" PROXY_URL, "no_proxy=" NO_PROXY_HOSTS,
};

int agent_exec_aslr = 1;
static int port = -1;
static struct buffer out;  /* frames waiting for the port */
static struct buffer in;   /* bytes read from the port, not yet a whole frame */
static struct exec execs[MAX_EXECS];
static unsigned char key[AGENT_KEY_BYTES];
static int keyed;
static int host_gone; /* the port said nobody is on the host's end: wait for SIGIO, not for the port */

/*
 * An exec's pipe output goes to the port with no copy in the guest: moved (splice, by page) into the
 * relay pipe, a frame's header for those bytes queued, then spliced from the relay into the port,
 * whose driver hands the pages to the host. The relay holds only the frame being sent, so every
 * splice into the port takes all of it: virtio_console builds one scatterlist entry per buffer the
 * pipe holds, and a splice that took fewer than all would pass empty entries to the device.
 */
static int relay[2] = {-1, -1};
static struct {
    size_t before, left; /* the frame's header is `before` bytes into `out`; `left` payload bytes in the relay */
} splicing;

/* The VM's key: learnt from the first keyed frame, then required on every one. */
static int authenticated(const unsigned char *p, size_t n) {
    if (n < AGENT_KEY_BYTES)
        return 0;
    if (!keyed) {
        memcpy(key, p, AGENT_KEY_BYTES);
        keyed = 1;
        return 1;
    }
    unsigned char diff = 0;
    for (int i = 0; i < AGENT_KEY_BYTES; i++)
        diff |= (unsigned char)(key[i] ^ p[i]);
    return diff == 0;
}

static unsigned char *head(const struct buffer *b) { return b->data + b->off; }

/* Room for `n` more bytes after the buffer's end. */
static unsigned char *reserve(struct buffer *b, size_t n) {
    if (b->off + b->len + n > b->cap) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
    }
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2;
        b->data = realloc(b->data, b->cap);
    }
    return b->data + b->off + b->len;
}

static void put(struct buffer *b, const void *data, size_t n) {
    memcpy(reserve(b, n), data, n);
    b->len += n;
}

static void consume(struct buffer *b, size_t n) {
    b->off += n, b->len -= n;
    if (!b->len)
        b->off = 0;
}

static void clear(struct buffer *b) { b->off = b->len = 0; }

static void be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16), p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) << 32 | rd32(p + 4); }

/* A frame's header at `p`, for a payload of `n` bytes after it. */
static void frame_head(unsigned char *p, uint8_t type, uint32_t ch, size_t n) {
    be32(p, (uint32_t)(n + 5));
    p[4] = type;
    be32(p + 5, ch);
}

static void send_frame(uint8_t type, uint32_t ch, const void *payload, size_t n) {
    unsigned char h[9];
    frame_head(h, type, ch, n);
    put(&out, h, sizeof h);
    put(&out, payload, n);
}

static void send_text(uint8_t type, uint32_t ch, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void send_text(uint8_t type, uint32_t ch, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    send_frame(type, ch, text, (size_t)(n < (int)sizeof text ? n : (int)sizeof text - 1));
}

static int open_port(void) {
    DIR *dir = opendir("/sys/class/virtio-ports");
    if (!dir)
        return -1;
    struct dirent *e;
    int fd = -1;
    while (fd < 0 && (e = readdir(dir))) {
        char path[300], name[64] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f) && !strncmp(name, AGENT_PORT_NAME, strlen(AGENT_PORT_NAME))) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        }
        fclose(f);
    }
    closedir(dir);
    return fd;
}

/* ---------------------------------------------------------------- sync */

static void kill_all_execs(void) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].pid > 0 && !execs[i].reaped)
            kill(-execs[i].pid, SIGKILL);
}

/* `next_key` (a SYNC_REKEY's, else NULL) becomes the VM's key once the sync succeeded, as its answer is
 * queued: a frame after this one needs it, and a sync that failed leaves the key as it was. */
static void handle_sync(uint32_t ch, const unsigned char *p, size_t n, const unsigned char *next_key) {
    if (n < 10) {
        send_text(F_ERROR, ch, "sync: short frame");
        return;
    }
    /* A new host session: execs of the one before have nobody to report to. */
    kill_all_execs();
    uint64_t ns = rd64(p);
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    uint8_t flags = 0;
    clock_settime(CLOCK_REALTIME, &ts);
    size_t hlen = (size_t)p[8] << 8 | p[9];
    if (10 + hlen > n) {
        send_text(F_ERROR, ch, "sync: bad hostname length");
        return;
    }
    if (hlen)
        sethostname((const char *)p + 10, hlen);
    size_t elen = n - 10 - hlen;
    int rnd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (rnd >= 0 && elen >= 4) {
        struct rand_pool_info *info = malloc(sizeof *info + elen + 4);
        info->entropy_count = (int)(elen * 8);
        info->buf_size = (int)elen;
        memcpy(info->buf, p + 10 + hlen, elen);
        if (ioctl(rnd, RNDADDENTROPY, info) == 0)
            flags |= 1;
        free(info);
#ifdef RNDRESEEDCRNG
        if (ioctl(rnd, RNDRESEEDCRNG) == 0)
            flags |= 2;
#endif
    }
    if (rnd >= 0)
        close(rnd);
    unsigned char reply[9];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t now_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    be32(reply, (uint32_t)(now_ns >> 32));
    be32(reply + 4, (uint32_t)now_ns);
    if (next_key) {
        memcpy(key, next_key, AGENT_KEY_BYTES);
        flags |= 4;
    }
    reply[8] = flags;
    send_frame(F_SYNC_OK, ch, reply, sizeof reply);
}

/* ---------------------------------------------------------------- exec */

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static struct exec *find_exec(uint32_t ch) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].pid > 0 && !execs[i].orphaned && execs[i].ch == ch)
            return &execs[i];
    return NULL;
}

/* The host went away: what it started has nobody to report to, and what it had not read yet nobody will. */
static void end_session(void) {
    kill_all_execs();
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].pid) {
            execs[i].orphaned = 1;
            close_fd(&execs[i].out), close_fd(&execs[i].err), close_fd(&execs[i].in);
            clear(&execs[i].stdin_pending);
        }
    clear(&out);
    clear(&in);
    static unsigned char drain[READ_CHUNK];
    while (splicing.left && read(relay[0], drain, sizeof drain) > 0)
        ;
    splicing.left = 0;
}

/* Append to an exec's env (with room for PROXY_ENV_COUNT more) each proxy setting init exported that it
 * lacks: execs see what the app sees unless the caller says otherwise. */
static void add_proxy_env(char **env, int envc) {
    int given = envc;
    for (int i = 0; i < PROXY_ENV_COUNT; i++) {
        size_t n = strcspn(proxy_env[i], "=") + 1; /* "NAME=" */
        int set = 0;
        for (int j = 0; j < given && !set; j++)
            set = !strncmp(env[j], proxy_env[i], n);
        for (char **e = environ; !set && *e; e++)
            if (!strncmp(*e, proxy_env[i], n)) {
                env[envc++] = *e;
                set = 1;
            }
    }
    env[envc] = NULL;
}

static void exec_in_child(char **argv, char **env, const char *cwd, uid_t uid, gid_t gid) {
    if (!agent_exec_aslr)
        personality((unsigned long)personality(0xffffffff) | ADDR_NO_RANDOMIZE); /* kept across execve */
    if (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        fprintf(stderr, "exec: cannot switch to uid %u gid %u: %s\n", uid, gid, strerror(errno));
        _exit(126);
    }
    if (*cwd && chdir(cwd) != 0) {
        fprintf(stderr, "exec: cannot enter %s: %s\n", cwd, strerror(errno));
        _exit(126);
    }
    const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char **e = env; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    int saved = ENOENT;
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, env);
        saved = errno;
    } else {
        for (const char *p = path; *p;) {
            size_t n = strcspn(p, ":");
            char full[4096];
            snprintf(full, sizeof full, "%.*s/%s", (int)n, p, argv[0]);
            execve(full, argv, env);
            if (errno != ENOENT)
                saved = errno;
            p += n + (p[n] == ':');
        }
    }
    fprintf(stderr, "exec: %s: %s\n", argv[0], strerror(saved));
    _exit(saved == ENOENT ? 127 : 126);
}

/* A terminal for an interactive exec: the child's stdin, stdout and stderr, its controlling tty. */
static int open_pty(int *master, int *slave, unsigned rows, unsigned cols) {
    *master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*master < 0 || grantpt(*master) || unlockpt(*master))
        return -1;
    *slave = open(ptsname(*master), O_RDWR | O_NOCTTY);
    if (*slave < 0)
        return -1;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(*master, TIOCSWINSZ, &ws);
    return 0;
}

static void handle_exec(uint32_t ch, const unsigned char *p, size_t n, int pty) {
    unsigned rows = 0, cols = 0;
    if (pty) {
        if (n < 4) {
            send_text(F_ERROR, ch, "exec: bad request");
            return;
        }
        rows = (unsigned)(p[0] << 8 | p[1]), cols = (unsigned)(p[2] << 8 | p[3]);
        p += 4, n -= 4;
    }
    struct exec *slot = NULL;
    for (int i = 0; i < MAX_EXECS && !slot; i++)
        if (execs[i].pid == 0)
            slot = &execs[i];
    if (find_exec(ch) || n < 12 || !slot) {
        send_text(F_ERROR, ch, "exec: %s", !slot ? "too many execs at once" : "bad request");
        return;
    }
    uid_t uid = rd32(p);
    gid_t gid = rd32(p + 4);
    int argc = p[8] << 8 | p[9], envc = p[10] << 8 | p[11];
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    char **env = calloc((size_t)envc + PROXY_ENV_COUNT + 1, sizeof *env);
    const char *cwd = "";
    const char *s = (const char *)p + 12, *end = (const char *)p + n;
    for (int i = 0; i < argc + envc + 1; i++) {
        const char *z = memchr(s, '\0', (size_t)(end - s));
        if (!z || argc == 0) {
            send_text(F_ERROR, ch, "exec: malformed argv/env");
            free(argv), free(env);
            return;
        }
        if (i < argc)
            argv[i] = (char *)s;
        else if (i < argc + envc)
            env[i - argc] = (char *)s;
        else
            cwd = s;
        s = z + 1;
    }
    add_proxy_env(env, envc);
    int o[2] = {-1, -1}, e[2] = {-1, -1}, i[2] = {-1, -1}, master = -1, slave = -1;
    int failed = pty ? open_pty(&master, &slave, rows, cols)
                     : (pipe2(o, O_CLOEXEC) || pipe2(e, O_CLOEXEC) || pipe2(i, O_CLOEXEC));
    if (failed) {
        send_text(F_ERROR, ch, "exec: %s: %s", pty ? "pty" : "pipe", strerror(errno));
        free(argv), free(env);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        setsid();
        if (pty) {
            ioctl(slave, TIOCSCTTY, 0); /* Ctrl-C in the terminal now interrupts this session */
            dup2(slave, 0), dup2(slave, 1), dup2(slave, 2);
            if (slave > 2)
                close(slave);
        } else {
            dup2(i[0], 0), dup2(o[1], 1), dup2(e[1], 2);
        }
        exec_in_child(argv, env, cwd, uid, gid);
    }
    free(argv), free(env);
    if (pty) {
        close(slave);
        o[0] = master, i[1] = dup(master); /* one terminal, read and written separately */
        fcntl(i[1], F_SETFD, FD_CLOEXEC);
    } else {
        close(o[1]), close(e[1]), close(i[0]);
    }
    if (pid < 0) {
        close_fd(&o[0]), close_fd(&e[0]), close_fd(&i[1]);
        send_text(F_ERROR, ch, "exec: fork: %s", strerror(errno));
        return;
    }
    fcntl(o[0], F_SETFL, O_NONBLOCK), fcntl(i[1], F_SETFL, O_NONBLOCK);
    if (e[0] >= 0) {
        fcntl(e[0], F_SETFL, O_NONBLOCK);
        fcntl(o[0], F_SETPIPE_SZ, PIPE_BYTES), fcntl(i[1], F_SETPIPE_SZ, PIPE_BYTES); /* best effort */
    }
    *slot = (struct exec){.ch = ch, .pid = pid, .out = o[0], .err = e[0], .in = i[1], .piped = !pty};
}

static void flush_stdin(struct exec *x) {
    while (x->in >= 0 && x->stdin_pending.len) {
        ssize_t n = write(x->in, head(&x->stdin_pending), x->stdin_pending.len);
        if (n < 0) {
            if (errno != EAGAIN)
                clear(&x->stdin_pending), close_fd(&x->in); /* EPIPE: the process does not read */
            return;
        }
        consume(&x->stdin_pending, (size_t)n);
    }
    if (x->stdin_eof && !x->stdin_pending.len)
        close_fd(&x->in);
}

/* Bytes for an exec's stdin: into its pipe at once if nothing waits before them, the rest kept. */
static void take_stdin(struct exec *x, const unsigned char *p, size_t n) {
    if (x->in >= 0 && !x->stdin_pending.len) {
        ssize_t w = write(x->in, p, n);
        if (w < 0 && errno != EAGAIN) {
            close_fd(&x->in); /* EPIPE: the process does not read */
            return;
        }
        if (w > 0)
            p += w, n -= (size_t)w;
    }
    if (x->in >= 0 && n)
        put(&x->stdin_pending, p, n);
}

/* Output of an exec: spliced through the relay when nothing else waits for the port, else read straight
 * into the port's queue behind room for its frame's header. */
static void pump(struct exec *x, int *fd, uint8_t type) {
    if (x->piped && relay[0] >= 0 && !out.len && !splicing.left) {
        ssize_t n = splice(*fd, NULL, relay[1], NULL, RELAY_BYTES, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (n > 0) {
            unsigned char h[9];
            frame_head(h, type, x->ch, (size_t)n);
            put(&out, h, sizeof h);
            splicing.before = out.len, splicing.left = (size_t)n;
            return;
        }
        if (n == 0)
            close_fd(fd);
        if (n == 0 || errno == EAGAIN)
            return;
    }
    unsigned char *frame = reserve(&out, 9 + READ_CHUNK);
    ssize_t n = read(*fd, frame + 9, READ_CHUNK);
    if (n > 0) {
        frame_head(frame, type, x->ch, (size_t)n);
        out.len += 9 + (size_t)n;
    } else if (n == 0 || errno != EAGAIN) {
        close_fd(fd);
    }
}

/* The exit goes out after all of the output: once reaped and both pipes are at EOF. */
static void finish(struct exec *x) {
    if (!x->reaped || x->out >= 0 || x->err >= 0)
        return;
    int32_t code = WIFEXITED(x->status) ? WEXITSTATUS(x->status) : -WTERMSIG(x->status);
    unsigned char payload[4];
    be32(payload, (uint32_t)code);
    if (!x->orphaned)
        send_frame(F_EXIT, x->ch, payload, sizeof payload);
    close_fd(&x->in);
    free(x->stdin_pending.data);
    memset(x, 0, sizeof *x);
}

/* ---------------------------------------------------------------- frames */

static void handle_frame(uint8_t type, uint32_t ch, const unsigned char *p, size_t n) {
    struct exec *x;
    switch (type) {
    case F_SYNC:
    case F_SYNC_REKEY:
    case F_EXEC:
    case F_PTY_EXEC:
        if (!authenticated(p, n)) {
            send_text(F_ERROR, ch, "the frame does not carry this VM's key");
            break;
        }
        p += AGENT_KEY_BYTES, n -= AGENT_KEY_BYTES;
        if (type == F_SYNC_REKEY && n < AGENT_KEY_BYTES)
            send_text(F_ERROR, ch, "sync: short frame");
        else if (type == F_SYNC_REKEY)
            handle_sync(ch, p + AGENT_KEY_BYTES, n - AGENT_KEY_BYTES, p);
        else if (type == F_SYNC)
            handle_sync(ch, p, n, NULL);
        else
            handle_exec(ch, p, n, type == F_PTY_EXEC);
        break;
    case F_RESIZE:
        if ((x = find_exec(ch)) && n >= 4) {
            struct winsize ws = {.ws_row = (unsigned short)(p[0] << 8 | p[1]), .ws_col = (unsigned short)(p[2] << 8 | p[3])};
            ioctl(x->out, TIOCSWINSZ, &ws);
        }
        break;
    case F_STDIN:
        if ((x = find_exec(ch))) {
            if (n == 0)
                x->stdin_eof = 1;
            else
                take_stdin(x, p, n);
            flush_stdin(x);
        }
        break;
    case F_KILL:
        if ((x = find_exec(ch)) && !x->reaped)
            kill(-x->pid, n ? p[0] : SIGKILL);
        break;
    default:
        send_text(F_ERROR, ch, "unknown frame type %u", type);
    }
}

/* Stdin waits in memory until its process reads it: past 1 MiB for any exec, the port is not read. */
static int stdin_full(void) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].pid && execs[i].stdin_pending.len > (1u << 20))
            return 1;
    return 0;
}

/* Whole frames from the port, handled in place. The port hands out at most a page per read, so it is read
 * until it is empty (or PORT_READ_MAX, or stdin is full), straight into the frame buffer. */
static int read_port(void) {
    for (size_t got = 0; got < PORT_READ_MAX && !stdin_full();) {
        ssize_t n = read(port, reserve(&in, READ_CHUNK), READ_CHUNK);
        if (n <= 0)
            return n == 0 || errno != EAGAIN ? -1 : 0;
        in.len += (size_t)n, got += (size_t)n;
        while (in.len >= 9) {
            uint32_t len = rd32(head(&in));
            if (len < 5 || len > AGENT_MAX_FRAME) {
                clear(&in); /* out of step: drop what we have and wait for the next frame */
                break;
            }
            if (in.len < 4 + (size_t)len)
                break;
            handle_frame(head(&in)[4], rd32(head(&in) + 5), head(&in) + 9, len - 5);
            consume(&in, 4 + (size_t)len);
        }
    }
    return 0;
}

/* The frame's payload would not splice into the port: read from the relay into `out` in its place. */
static void unsplice(void) {
    struct buffer rest = {0};
    put(&rest, head(&out) + splicing.before, out.len - splicing.before);
    out.len = splicing.before;
    while (splicing.left) {
        ssize_t n = read(relay[0], reserve(&out, splicing.left), splicing.left);
        if (n <= 0)
            break;
        out.len += (size_t)n, splicing.left -= (size_t)n;
    }
    put(&out, rest.data, rest.len);
    free(rest.data);
    splicing.left = 0;
}

static void write_port(void) {
    for (;;) {
        size_t upto = splicing.left ? splicing.before : out.len;
        while (upto) {
            ssize_t n = write(port, head(&out), upto);
            if (n <= 0)
                return;
            consume(&out, (size_t)n);
            upto -= (size_t)n;
            if (splicing.left)
                splicing.before -= (size_t)n;
        }
        if (!splicing.left)
            return;
        ssize_t n = splice(relay[0], NULL, port, NULL, splicing.left, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0)
            unsplice();
        else
            splicing.left -= (size_t)n;
    }
}

void agent_main(void) {
    /* SIGIO is blocked (and read from the signalfd) before the port may send it: unblocked, it kills */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigaddset(&chld, SIGPIPE);
    sigaddset(&chld, SIGIO);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    for (int i = 0; port < 0; i++) {
        port = open_port();
        if (port < 0)
            usleep(i < 100 ? 10000 : 1000000); /* the virtio-serial driver may still be probing */
    }
    /* SIGIO on every change of the host's side (connected, gone) and on data from it */
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
    if (pipe2(relay, O_CLOEXEC | O_NONBLOCK) == 0)
        fcntl(relay[1], F_SETPIPE_SZ, RELAY_BYTES);
    for (;;) {
        struct pollfd fds[2 + 3 * MAX_EXECS];
        struct exec *owner[2 + 3 * MAX_EXECS];
        int nfds = 0;
        /* a negative fd is skipped by poll: with no host the port would report hang-up without end */
        fds[nfds++] = (struct pollfd){.fd = host_gone ? -1 : port,
                                      .events = (stdin_full() ? 0 : POLLIN) | (out.len || splicing.left ? POLLOUT : 0)};
        fds[nfds++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        /* Output is read only while the port keeps up: a host that stops reading stops the process. */
        int backlog = out.len > 4 * READ_CHUNK;
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *x = &execs[i];
            if (!x->pid)
                continue;
            if (x->out >= 0 && !backlog)
                owner[nfds] = x, fds[nfds++] = (struct pollfd){.fd = x->out, .events = POLLIN};
            if (x->err >= 0 && !backlog)
                owner[nfds] = x, fds[nfds++] = (struct pollfd){.fd = x->err, .events = POLLIN};
            if (x->in >= 0 && x->stdin_pending.len)
                owner[nfds] = x, fds[nfds++] = (struct pollfd){.fd = x->in, .events = POLLOUT};
        }
        int ready = poll(fds, (nfds_t)nfds, host_gone ? HOST_GONE_CHECK_MS : -1);
        if (ready < 0)
            continue;
        if (ready == 0)
            host_gone = 0; /* the fallback: look at the port once more */
        /* No host: the port reads EOF (0 bytes) once what the host sent is read, or reports only POLLHUP. */
        int gone = (fds[0].revents & POLLHUP && !(fds[0].revents & POLLIN)) ||
                   (fds[0].revents & POLLIN && read_port() < 0);
        if (gone && !host_gone)
            end_session();
        host_gone |= gone;
        if (fds[0].revents & POLLOUT && !host_gone)
            write_port();
        for (int k = 2; k < nfds; k++) {
            struct exec *x = owner[k];
            if (!fds[k].revents)
                continue;
            if (fds[k].fd == x->out)
                pump(x, &x->out, F_STDOUT);
            else if (fds[k].fd == x->err)
                pump(x, &x->err, F_STDERR);
            else if (fds[k].fd == x->in)
                flush_stdin(x);
            if (splicing.left && !host_gone)
                write_port(); /* its header, then as much as the port takes, before the next pipe is read */
        }
        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) == sizeof si)
            if (si.ssi_signo == SIGIO)
                host_gone = 0; /* the host's side changed: the port says how it is now */
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < MAX_EXECS; i++)
                if (execs[i].pid == pid)
                    execs[i].reaped = 1, execs[i].status = status;
        }
        for (int i = 0; i < MAX_EXECS; i++)
            if (execs[i].pid)
                finish(&execs[i]);
        if (!host_gone)
            write_port();
    }
}
