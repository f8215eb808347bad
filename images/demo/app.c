/*
 * demo guest app: a small HTTP/1.1 server used to exercise microvm-edge.
 *
 *   app PORT [PORT...]      listens on 0.0.0.0:PORT for each argument
 *
 * One process per connection (fork); HTTP/1.1 keep-alive and pipelining; request
 * bodies by Content-Length or chunked; every response carries Content-Length or
 * is chunked. State that must survive suspend/restore lives in guest memory: a
 * counter in a MAP_SHARED page that every forked child updates atomically.
 *
 * Endpoints: / and /state (GET and POST / count: each request the app runs adds one), /healthz,
 * /headers, /download, /upload, /sse, /slow, /ws
 * (HEAD is accepted on /healthz and /headers only; other methods on a known path get 405).
 * Build: gcc -static -O2 -o app app.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define MAX_LINE 8192      /* request line, one header line, one chunk-size line */
#define MAX_HEAD 65536     /* whole request head */
#define MAX_HEADERS 100
#define IO_CHUNK 65536     /* download/upload/websocket copy unit */
#define PATTERN 251        /* body byte i == i % 251: a prime, so offsets can't alias block sizes */

static volatile uint64_t *counter;  /* MAP_SHARED: one counter for all children */
static unsigned char pattern[IO_CHUNK + PATTERN];  /* pattern[j] == j % 251 */
static int head_only;  /* current request is HEAD: headers as for GET, never a body */

/* ---------- buffered connection ---------- */

struct conn {
    int fd;
    size_t pos, len;
    unsigned char buf[IO_CHUNK];
};

static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int writev_all(int fd, struct iovec *iov, int cnt) {
    while (cnt > 0) {
        ssize_t w = writev(fd, iov, cnt);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Refill when empty. Returns bytes available, 0 on EOF, -1 on error. */
static ssize_t fill(struct conn *c) {
    if (c->pos < c->len) return (ssize_t)(c->len - c->pos);
    c->pos = c->len = 0;
    for (;;) {
        ssize_t r = read(c->fd, c->buf, sizeof c->buf);
        if (r < 0 && errno == EINTR) continue;
        if (r > 0) c->len = (size_t)r;
        return r;
    }
}

/* Up to `max` bytes into out; reads the socket directly once the buffer is drained. */
static ssize_t conn_read(struct conn *c, void *out, size_t max) {
    if (c->pos < c->len) {
        size_t n = c->len - c->pos < max ? c->len - c->pos : max;
        memcpy(out, c->buf + c->pos, n);
        c->pos += n;
        return (ssize_t)n;
    }
    for (;;) {
        ssize_t r = read(c->fd, out, max);
        if (r < 0 && errno == EINTR) continue;
        return r;
    }
}

static int conn_read_exact(struct conn *c, void *out, size_t n) {
    unsigned char *p = out;
    while (n > 0) {
        ssize_t r = conn_read(c, p, n);
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One line without its CRLF (bare LF accepted), NUL-terminated.
 * Returns length, -1 on EOF/error before any byte, -2 if too long, -3 on EOF mid-line. */
static ssize_t read_line(struct conn *c, char *out, size_t cap) {
    size_t n = 0;
    for (;;) {
        ssize_t avail = fill(c);
        if (avail <= 0) return n == 0 ? -1 : -3;
        unsigned char *start = c->buf + c->pos;
        unsigned char *nl = memchr(start, '\n', (size_t)avail);
        size_t take = nl ? (size_t)(nl - start) : (size_t)avail;
        if (n + take >= cap) return -2;
        memcpy(out + n, start, take);
        n += take;
        c->pos += take + (nl ? 1 : 0);
        if (nl) {
            if (n > 0 && out[n - 1] == '\r') n--;
            out[n] = 0;
            return (ssize_t)n;
        }
    }
}

/* ---------- growable string + JSON ---------- */

struct sb {
    char *p;
    size_t len, cap;
};

static void sb_reserve(struct sb *s, size_t extra) {
    if (s->len + extra + 1 <= s->cap) return;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < s->len + extra + 1) cap *= 2;
    char *p = realloc(s->p, cap);
    if (!p) _exit(1);  /* out of memory in a per-connection child: drop the connection */
    s->p = p;
    s->cap = cap;
}

static void sb_printf(struct sb *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    sb_reserve(s, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(s->p + s->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    s->len += (size_t)n;
}

/* Bytes >= 0x80 are escaped as \u00XX (header bytes read as ISO-8859-1), so the
 * output is valid JSON whatever the client sent. */
static void sb_json_str(struct sb *s, const char *str) {
    sb_reserve(s, strlen(str) * 6 + 2);
    s->p[s->len++] = '"';
    for (const unsigned char *q = (const unsigned char *)str; *q; q++) {
        if (*q == '"' || *q == '\\') {
            s->p[s->len++] = '\\';
            s->p[s->len++] = (char)*q;
        } else if (*q < 0x20 || *q >= 0x7f) {
            s->len += (size_t)sprintf(s->p + s->len, "\\u%04x", *q);
        } else {
            s->p[s->len++] = (char)*q;
        }
    }
    s->p[s->len++] = '"';
    s->p[s->len] = 0;
}

/* ---------- request ---------- */

enum body_kind { BODY_NONE, BODY_LENGTH, BODY_CHUNKED };

struct request {
    char head[MAX_HEAD];  /* request line + header lines, NUL-separated */
    char *method, *target, *path, *query;
    char pathbuf[MAX_HEAD];
    char *names[MAX_HEADERS], *values[MAX_HEADERS];
    int nheaders;
    int http11, keep_alive, expect_continue;
    enum body_kind body;
    uint64_t remaining;  /* BODY_LENGTH: bytes left; BODY_CHUNKED: bytes left in chunk */
    int body_done;
};

static const char *header(struct request *r, const char *name) {
    for (int i = 0; i < r->nheaders; i++)
        if (strcasecmp(r->names[i], name) == 0) return r->values[i];
    return NULL;
}

/* Is `token` one of the comma-separated tokens of every `name` header? (Connection, Upgrade) */
static int header_has_token(struct request *r, const char *name, const char *token) {
    size_t tl = strlen(token);
    for (int i = 0; i < r->nheaders; i++) {
        if (strcasecmp(r->names[i], name) != 0) continue;
        for (const char *p = r->values[i]; *p;) {
            while (*p == ' ' || *p == '\t' || *p == ',') p++;
            const char *e = p;
            while (*e && *e != ',') e++;
            const char *t = e;
            while (t > p && (t[-1] == ' ' || t[-1] == '\t')) t--;
            if ((size_t)(t - p) == tl && strncasecmp(p, token, tl) == 0) return 1;
            p = e;
        }
    }
    return 0;
}

/* Strict decimal: digits only, no sign, no overflow. */
static int parse_u64(const char *s, size_t n, uint64_t *out) {
    uint64_t v = 0;
    if (n == 0 || n > 19) return -1;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i])) return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

/* Query parameter `key` as an integer; absent -> def. Returns -1 if malformed or above max. */
static int query_u64(struct request *r, const char *key, uint64_t def, uint64_t max, uint64_t *out) {
    size_t kl = strlen(key);
    *out = def;
    for (const char *p = r->query; p && *p;) {
        const char *e = strchr(p, '&');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n > kl && strncmp(p, key, kl) == 0 && p[kl] == '=') {
            if (parse_u64(p + kl + 1, n - kl - 1, out) < 0 || *out > max) return -1;
        }
        p = e ? e + 1 : NULL;
    }
    return 0;
}

/* Reads and parses one request head. Returns 0 ok, 1 clean EOF, or an HTTP error status. */
static int read_request(struct conn *c, struct request *r) {
    size_t used = 0;
    r->nheaders = r->http11 = r->keep_alive = r->expect_continue = 0;
    r->body = BODY_NONE;
    r->body_done = 1;
    r->remaining = 0;
    char *lines[MAX_HEADERS + 1];
    int nlines = 0;
    for (;;) {
        ssize_t n = read_line(c, r->head + used, sizeof r->head - used);
        if (n == -1) return nlines == 0 ? 1 : 400;
        if (n == -3) return 400;
        if (n < 0) return nlines == 0 ? 414 : 431;
        if (n == 0) {
            if (nlines == 0) continue;  /* RFC 9112 2.2: ignore empty lines before a request */
            break;
        }
        if (nlines == MAX_HEADERS + 1) return 431;
        lines[nlines++] = r->head + used;
        used += (size_t)n + 1;
    }

    /* request line: METHOD SP target SP HTTP/1.x */
    char *sp1 = strchr(lines[0], ' ');
    char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2 || sp1 == lines[0] || sp2 == sp1 + 1 || strchr(sp2 + 1, ' ')) return 400;
    *sp1 = *sp2 = 0;
    r->method = lines[0];
    r->target = sp1 + 1;
    const char *version = sp2 + 1;
    if (strcmp(version, "HTTP/1.1") == 0) r->http11 = 1;
    else if (strcmp(version, "HTTP/1.0") == 0) r->http11 = 0;
    else return strncmp(version, "HTTP/", 5) == 0 ? 505 : 400;
    for (const char *m = r->method; *m; m++)
        if (!isupper((unsigned char)*m) && *m != '-' && *m != '_') return 400;

    /* origin-form "/p?q", or absolute-form "http://host/p?q" from a forward proxy */
    const char *t = r->target;
    if (strncasecmp(t, "http://", 7) == 0 || strncasecmp(t, "https://", 8) == 0) {
        t = strchr(strstr(t, "://") + 3, '/');
        if (!t) t = "/";
    }
    if (t[0] != '/') return 400;
    snprintf(r->pathbuf, sizeof r->pathbuf, "%s", t);
    r->path = r->pathbuf;
    r->query = strchr(r->pathbuf, '?');
    if (r->query) *r->query++ = 0;

    for (int i = 1; i < nlines; i++) {
        char *line = lines[i];
        if (line[0] == ' ' || line[0] == '\t') return 400;  /* obsolete line folding */
        char *colon = strchr(line, ':');
        if (!colon || colon == line) return 400;
        for (char *p = line; p < colon; p++)
            if (*p <= ' ' || *p >= 0x7f) return 400;  /* no whitespace before ':' (smuggling) */
        *colon = 0;
        char *v = colon + 1, *end = v + strlen(v);
        while (*v == ' ' || *v == '\t') v++;
        while (end > v && (end[-1] == ' ' || end[-1] == '\t')) *--end = 0;
        r->names[r->nheaders] = line;
        r->values[r->nheaders] = v;
        r->nheaders++;
    }

    if (r->http11)
        r->keep_alive = !header_has_token(r, "Connection", "close");
    else
        r->keep_alive = header_has_token(r, "Connection", "keep-alive");

    /* Body framing. Both headers at once is a smuggling vector: refuse (RFC 9112 6.1). */
    const char *te = header(r, "Transfer-Encoding");
    const char *cl = NULL;
    for (int i = 0; i < r->nheaders; i++) {
        if (strcasecmp(r->names[i], "Content-Length") != 0) continue;
        if (cl && strcmp(cl, r->values[i]) != 0) return 400;
        cl = r->values[i];
    }
    if (te && cl) return 400;
    if (te) {
        if (strcasecmp(te, "chunked") != 0) return 501;
        r->body = BODY_CHUNKED;
        r->body_done = 0;
    } else if (cl) {
        if (parse_u64(cl, strlen(cl), &r->remaining) < 0) return 400;
        if (r->remaining > 0) {
            r->body = BODY_LENGTH;
            r->body_done = 0;
        }
    }
    const char *expect = header(r, "Expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue") != 0) return 417;
        r->expect_continue = r->http11 && !r->body_done;
    }
    return 0;
}

/* Next piece of the request body. Returns >0 bytes, 0 at the end, -1 on a broken body. */
static ssize_t body_read(struct conn *c, struct request *r, void *out, size_t max) {
    char line[MAX_LINE];
    if (r->body_done) return 0;
    if (r->expect_continue) {
        /* the client waits for this before sending a body it announced with Expect */
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        r->expect_continue = 0;
        if (write_all(c->fd, cont, sizeof cont - 1) < 0) return -1;
    }
    if (r->body == BODY_CHUNKED && r->remaining == 0) {
        ssize_t n = read_line(c, line, sizeof line);
        if (n <= 0) return -1;
        char *end;
        errno = 0;
        if (!isxdigit((unsigned char)line[0])) return -1;  /* strtoull would take "-1" or " 1" */
        unsigned long long size = strtoull(line, &end, 16);
        if (errno || (*end && *end != ';' && *end != ' ' && *end != '\t')) return -1;
        if (size == 0) {
            /* last chunk: skip trailer fields up to the empty line */
            while ((n = read_line(c, line, sizeof line)) > 0) {
            }
            if (n < 0) return -1;
            r->body_done = 1;
            return 0;
        }
        r->remaining = size;
    }
    size_t want = r->remaining < max ? (size_t)r->remaining : max;
    ssize_t got = conn_read(c, out, want);
    if (got <= 0) return -1;
    r->remaining -= (uint64_t)got;
    if (r->remaining == 0) {
        if (r->body == BODY_LENGTH) {
            r->body_done = 1;
        } else if (read_line(c, line, sizeof line) != 0) {
            return -1;  /* chunk data must be followed by CRLF */
        }
    }
    return got;
}

/* Discard an unread body so the next request on the connection starts in the right place. */
static int body_drain(struct conn *c, struct request *r) {
    static unsigned char sink[IO_CHUNK];
    ssize_t n;
    while ((n = body_read(c, r, sink, sizeof sink)) > 0) {
    }
    return (int)n;
}

/* ---------- responses ---------- */

static const char *reason(int status) {
    switch (status) {
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
    }
}

static const char *error_code(int status) {
    switch (status) {
    case 414: return "uri_too_long";
    case 417: return "expectation_failed";
    case 431: return "headers_too_large";
    case 501: return "not_implemented";
    case 505: return "http_version_not_supported";
    default: return "bad_request";
    }
}

/* Status line + common headers; `extra` is zero or more "Name: value\r\n" lines. */
static void head_start(struct sb *h, int status, const char *ctype, int keep, const char *extra) {
    sb_printf(h, "HTTP/1.1 %d %s\r\nServer: mvm-demo\r\nContent-Type: %s\r\n%s%s", status, reason(status),
              ctype, keep ? "" : "Connection: close\r\n", extra ? extra : "");
}

static int send_full(int fd, int status, const char *ctype, const char *body, size_t len, int keep,
                     const char *extra) {
    struct sb h = {0};
    head_start(&h, status, ctype, keep, extra);
    sb_printf(&h, "Content-Length: %zu\r\n\r\n", len);
    struct iovec iov[2] = {{h.p, h.len}, {(void *)body, len}};
    int rc = writev_all(fd, iov, len && !head_only ? 2 : 1);
    free(h.p);
    return rc;
}

static int send_json(int fd, int status, struct sb *body, int keep) {
    sb_printf(body, "\n");
    int rc = send_full(fd, status, "application/json", body->p, body->len, keep, NULL);
    free(body->p);
    body->p = NULL;
    return rc;
}

static int send_error_extra(int fd, int status, const char *error, const char *path, int keep, const char *extra) {
    struct sb b = {0};
    sb_printf(&b, "{\"error\": ");
    sb_json_str(&b, error);
    if (path) {
        sb_printf(&b, ", \"path\": ");
        sb_json_str(&b, path);
    }
    sb_printf(&b, "}\n");
    int rc = send_full(fd, status, "application/json", b.p, b.len, keep, extra);
    free(b.p);
    return rc;
}

static int send_error(int fd, int status, const char *error, const char *path, int keep) {
    return send_error_extra(fd, status, error, path, keep, NULL);
}

static int send_chunk(int fd, const void *data, size_t len) {
    char size[32];
    int n = snprintf(size, sizeof size, "%zx\r\n", len);
    struct iovec iov[3] = {{size, (size_t)n}, {(void *)data, len}, {"\r\n", 2}};
    return writev_all(fd, iov, 3);
}

static int send_last_chunk(int fd) { return write_all(fd, "0\r\n\r\n", 5); }

static void sleep_ms(uint64_t ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* First line of a small /proc file, without the newline. */
static void read_proc(const char *path, char *out, size_t cap) {
    out[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, out, cap - 1);
    close(fd);
    out[n > 0 ? n : 0] = 0;
    out[strcspn(out, " \n")] = 0;
}

/* ---------- endpoints ---------- */

static int local_port(int fd) {
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    return getsockname(fd, (struct sockaddr *)&a, &l) == 0 ? ntohs(a.sin_port) : 0;
}

/* Read once at start: the kernel makes boot_id on first read, so reading it before the
 * template is snapshotted is what makes every clone report the template's boot. */
static char boot_id[64];

static int do_state(struct conn *c, struct request *r) {
    char uptime[64];
    uint64_t n = __atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST);
    read_proc("/proc/uptime", uptime, sizeof uptime);
    struct sb b = {0};
    sb_printf(&b, "{\"counter\": %llu, \"boot_id\": ", (unsigned long long)n);
    sb_json_str(&b, boot_id);
    sb_printf(&b, ", \"uptime\": %s, \"port\": %d}", uptime[0] ? uptime : "null", local_port(c->fd));
    return send_json(c->fd, 200, &b, r->keep_alive);
}

static int do_headers(struct conn *c, struct request *r) {
    struct sb b = {0};
    sb_printf(&b, "{\"method\": ");
    sb_json_str(&b, r->method);
    sb_printf(&b, ", \"target\": ");
    sb_json_str(&b, r->target);
    sb_printf(&b, ", \"headers\": [");
    for (int i = 0; i < r->nheaders; i++) {
        sb_printf(&b, i ? ", [" : "[");
        sb_json_str(&b, r->names[i]);
        sb_printf(&b, ", ");
        sb_json_str(&b, r->values[i]);
        sb_printf(&b, "]");
    }
    sb_printf(&b, "]}");
    return send_json(c->fd, 200, &b, r->keep_alive);
}

static int do_download(struct conn *c, struct request *r) {
    uint64_t total, chunked;
    if (query_u64(r, "bytes", 0, UINT64_MAX / 2, &total) < 0 || query_u64(r, "chunked", 0, 1, &chunked) < 0)
        return send_error(c->fd, 400, "bad_query", r->target, 0) < 0 ? -1 : 1;
    struct sb h = {0};
    head_start(&h, 200, "application/octet-stream", r->keep_alive, NULL);
    if (chunked)
        sb_printf(&h, "Transfer-Encoding: chunked\r\n\r\n");
    else
        sb_printf(&h, "Content-Length: %llu\r\n\r\n", (unsigned long long)total);
    int rc = write_all(c->fd, h.p, h.len);
    free(h.p);
    /* stream from the precomputed pattern: pattern + off%251 continues the sequence at `off` */
    for (uint64_t off = 0; rc == 0 && off < total;) {
        size_t n = total - off < IO_CHUNK ? (size_t)(total - off) : IO_CHUNK;
        const unsigned char *p = pattern + off % PATTERN;
        rc = chunked ? send_chunk(c->fd, p, n) : write_all(c->fd, p, n);
        off += n;
    }
    if (rc == 0 && chunked) rc = send_last_chunk(c->fd);
    return rc;
}

static int do_upload(struct conn *c, struct request *r) {
    static unsigned char buf[IO_CHUNK];
    uint64_t off = 0;
    int64_t first_bad = -1;
    ssize_t n;
    while ((n = body_read(c, r, buf, sizeof buf)) > 0) {
        if (first_bad < 0 && memcmp(buf, pattern + off % PATTERN, (size_t)n) != 0) {
            for (ssize_t i = 0; i < n; i++) {
                if (buf[i] != (off + (uint64_t)i) % PATTERN) {
                    first_bad = (int64_t)(off + (uint64_t)i);
                    break;
                }
            }
        }
        off += (uint64_t)n;
    }
    if (n < 0) return send_error(c->fd, 400, "bad_body", NULL, 0) < 0 ? -1 : 1;
    struct sb b = {0};
    sb_printf(&b, "{\"bytes\": %llu, \"pattern_ok\": %s, \"first_bad\": %lld}", (unsigned long long)off,
              first_bad < 0 ? "true" : "false", (long long)first_bad);
    return send_json(c->fd, 200, &b, r->keep_alive);
}

static int do_sse(struct conn *c, struct request *r) {
    uint64_t n, interval;
    if (query_u64(r, "n", 5, 1000000, &n) < 0 || query_u64(r, "interval_ms", 100, 3600000, &interval) < 0)
        return send_error(c->fd, 400, "bad_query", r->target, 0) < 0 ? -1 : 1;
    struct sb h = {0};
    head_start(&h, 200, "text/event-stream", r->keep_alive, "Cache-Control: no-cache\r\n");
    sb_printf(&h, "Transfer-Encoding: chunked\r\n\r\n");
    int rc = write_all(c->fd, h.p, h.len);
    free(h.p);
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        if (i > 0) sleep_ms(interval);
        char ev[64];
        int len = snprintf(ev, sizeof ev, "data: %llu\n\n", (unsigned long long)i);
        rc = send_chunk(c->fd, ev, (size_t)len);
    }
    return rc == 0 ? send_last_chunk(c->fd) : rc;
}

static int do_slow(struct conn *c, struct request *r) {
    uint64_t ms;
    if (query_u64(r, "ms", 1000, 3600000, &ms) < 0)
        return send_error(c->fd, 400, "bad_query", r->target, 0) < 0 ? -1 : 1;
    sleep_ms(ms);
    struct sb b = {0};
    sb_printf(&b, "{\"slept_ms\": %llu}", (unsigned long long)ms);
    return send_json(c->fd, 200, &b, r->keep_alive);
}

/* ---------- WebSocket (RFC 6455) ---------- */

#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

static void sha1(const unsigned char *data, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;  /* message + 0x80 + 64-bit length, padded */
    for (size_t blk = 0; blk < total; blk += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++) {
            uint32_t v = 0;
            for (int j = 0; j < 4; j++) {
                size_t k = blk + (size_t)(i * 4 + j);
                unsigned char byte;
                if (k < len) byte = data[k];
                else if (k == len) byte = 0x80;
                else if (k >= total - 8) byte = (unsigned char)(((uint64_t)len * 8) >> (8 * (total - 1 - k)));
                else byte = 0;
                v = (v << 8) | byte;
            }
            w[i] = v;
        }
        for (int i = 16; i < 80; i++) w[i] = ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = ROL(a, 5) + f + e + k + w[i];
            e = d, d = c, c = ROL(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    for (int i = 0; i < 20; i++) out[i] = (unsigned char)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const unsigned char *in, size_t len, char *out) {
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len) v |= in[i + 2];
        out[o++] = tbl[(v >> 18) & 63];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = i + 1 < len ? tbl[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? tbl[v & 63] : '=';
    }
    out[o] = 0;
}

static int ws_send_header(int fd, int fin_opcode, uint64_t len) {
    unsigned char h[10];
    size_t n = 2;
    h[0] = (unsigned char)fin_opcode;
    if (len < 126) {
        h[1] = (unsigned char)len;
    } else if (len <= 0xFFFF) {
        h[1] = 126;
        h[2] = (unsigned char)(len >> 8), h[3] = (unsigned char)len;
        n = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)(len >> (56 - 8 * i));
        n = 10;
    }
    return write_all(fd, h, n);
}

/* Protocol error: send a close frame with `code`; the caller then drops the connection. */
static void ws_fail(int fd, uint16_t code) {
    unsigned char p[2] = {(unsigned char)(code >> 8), (unsigned char)code};
    if (ws_send_header(fd, 0x88, 2) == 0) write_all(fd, p, 2);
}

/* Echo loop. Frames are echoed one by one as they arrive (fragmented messages keep their
 * fragmentation), streaming the payload so frame size is not limited by memory. */
static void ws_loop(struct conn *c) {
    static unsigned char buf[IO_CHUNK];
    for (;;) {
        unsigned char h[2], ext[8], mask[4];
        if (conn_read_exact(c, h, 2) < 0) return;
        int fin = h[0] & 0x80, opcode = h[0] & 0x0F;
        uint64_t len = h[1] & 0x7F;
        if ((h[0] & 0x70) || !(h[1] & 0x80)) {  /* RSV bits without an extension / unmasked client frame */
            ws_fail(c->fd, 1002);
            return;
        }
        if (len == 126) {
            if (conn_read_exact(c, ext, 2) < 0) return;
            len = (uint64_t)ext[0] << 8 | ext[1];
        } else if (len == 127) {
            if (conn_read_exact(c, ext, 8) < 0) return;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | ext[i];
            if (len >> 63) {
                ws_fail(c->fd, 1002);
                return;
            }
        }
        if (conn_read_exact(c, mask, 4) < 0) return;
        int control = opcode & 0x8;
        if ((control && (len > 125 || !fin)) || (opcode > 2 && opcode != 8 && opcode != 9 && opcode != 10)) {
            ws_fail(c->fd, 1002);
            return;
        }

        int reply = opcode == 9 ? 0x0A : opcode;  /* ping -> pong, everything else echoes */
        int echo = opcode != 10;                  /* unsolicited pongs are ignored */
        if (echo && ws_send_header(c->fd, (fin ? 0x80 : 0) | reply, len) < 0) return;
        for (uint64_t off = 0; off < len;) {
            size_t n = len - off < sizeof buf ? (size_t)(len - off) : sizeof buf;
            if (conn_read_exact(c, buf, n) < 0) return;
            for (size_t i = 0; i < n; i++) buf[i] ^= mask[(off + i) & 3];
            if (echo && write_all(c->fd, buf, n) < 0) return;
            off += n;
        }
        if (opcode == 8) return;  /* close echoed: the connection ends */
    }
}

static int do_ws(struct conn *c, struct request *r) {
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    const char *key = header(r, "Sec-WebSocket-Key");
    const char *version = header(r, "Sec-WebSocket-Version");
    if (!header_has_token(r, "Upgrade", "websocket") || !header_has_token(r, "Connection", "upgrade") || !key ||
        strlen(key) != 24 || !r->http11 || !r->body_done)
        return send_error(c->fd, 400, "websocket_upgrade_required", r->path, 0) < 0 ? -1 : 1;
    if (!version || strcmp(version, "13") != 0) {
        struct sb b = {0};
        sb_printf(&b, "{\"error\": \"unsupported_websocket_version\"}\n");
        send_full(c->fd, 426, "application/json", b.p, b.len, 0, "Sec-WebSocket-Version: 13\r\n");
        free(b.p);
        return 1;
    }
    unsigned char digest[20], in[24 + sizeof guid];
    char accept[32], resp[256];
    memcpy(in, key, 24);
    memcpy(in + 24, guid, sizeof guid - 1);
    sha1(in, 24 + sizeof guid - 1, digest);
    base64(digest, 20, accept);
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n\r\n", accept);
    if (write_all(c->fd, resp, (size_t)n) < 0) return -1;
    ws_loop(c);
    return 1;  /* the connection is no longer HTTP */
}

/* ---------- dispatch ---------- */

enum route { R_STATE, R_HEALTH, R_HEADERS, R_DOWNLOAD, R_UPLOAD, R_SSE, R_SLOW, R_WS };

static const struct {
    const char *path, *method;
    enum route route;
} routes[] = {
    {"/", "GET", R_STATE},           {"/", "POST", R_STATE},         {"/state", "GET", R_STATE},
    {"/healthz", "GET", R_HEALTH},
    {"/headers", "GET", R_HEADERS},  {"/download", "GET", R_DOWNLOAD}, {"/upload", "POST", R_UPLOAD},
    {"/sse", "GET", R_SSE},          {"/slow", "GET", R_SLOW},       {"/ws", "GET", R_WS},
};

/* Returns 0 to keep the connection for another request, nonzero to close it. */
static int handle(struct conn *c, struct request *r) {
    int found = -1;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (strcmp(r->path, routes[i].path) == 0 && (found < 0 || strcmp(r->method, routes[i].method) == 0))
            found = (int)i;
    int ok = found >= 0 && strcmp(r->method, routes[found].method) == 0;
    /* HEAD only where a GET has no side effect and no streamed body (readiness probes) */
    if (head_only && found >= 0 && (routes[found].route == R_HEALTH || routes[found].route == R_HEADERS)) ok = 1;
    if (ok && routes[found].route == R_UPLOAD) return do_upload(c, r) || !r->keep_alive;
    if (ok && routes[found].route == R_WS) return do_ws(c, r);
    /* everything else ignores the body: drain it so the next request starts in the right place */
    if (body_drain(c, r) < 0) {
        send_error(c->fd, 400, "bad_body", NULL, 0);
        return 1;
    }
    int rc;
    if (found < 0) {
        rc = send_error(c->fd, 404, "not_found", r->path, r->keep_alive);
    } else if (!ok) {
        char allow[64];
        int probe = routes[found].route == R_HEALTH || routes[found].route == R_HEADERS;
        snprintf(allow, sizeof allow, "Allow: %s%s\r\n", routes[found].method, probe ? ", HEAD" : "");
        rc = send_error_extra(c->fd, 405, "method_not_allowed", r->path, r->keep_alive, allow);
    } else {
        switch (routes[found].route) {
        case R_STATE: rc = do_state(c, r); break;
        case R_HEALTH: rc = send_full(c->fd, 200, "text/plain", "ok\n", 3, r->keep_alive, NULL); break;
        case R_HEADERS: rc = do_headers(c, r); break;
        case R_DOWNLOAD: rc = do_download(c, r); break;
        case R_SSE: rc = do_sse(c, r); break;
        default: rc = do_slow(c, r); break;
        }
    }
    return rc || !r->keep_alive;
}

static void serve(int fd) {
    static struct conn c;
    static struct request r;
    int one = 1, idle = 60;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  /* SSE/WS frames must not wait */
    /* a client that vanishes without FIN (e.g. host side gone while suspended) must not pin a child */
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    c.fd = fd;
    for (;;) {
        head_only = 0;
        int status = read_request(&c, &r);
        if (status == 1) return;  /* client closed between requests */
        if (status) {
            send_error(fd, status, error_code(status), NULL, 0);
            return;
        }
        head_only = strcmp(r.method, "HEAD") == 0;
        if (handle(&c, &r)) return;
    }
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0) {
        fprintf(stderr, "app: port %d: %s\n", port, strerror(errno));
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    struct pollfd pfd[MAX_PORTS];
    int n = 0;
    if (argc < 2 || argc - 1 > MAX_PORTS) {
        fprintf(stderr, "usage: %s PORT [PORT...] (at most %d)\n", argv[0], MAX_PORTS);
        return 2;
    }
    signal(SIGCHLD, SIG_IGN);  /* children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);  /* a closed peer shows up as EPIPE from write() */
    for (size_t j = 0; j < sizeof pattern; j++) pattern[j] = (unsigned char)(j % PATTERN);
    /* created before fork()ing children so they all map the same page */
    counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (counter == MAP_FAILED) {
        perror("app: mmap");
        return 1;
    }
    read_proc("/proc/sys/kernel/random/boot_id", boot_id, sizeof boot_id);
    for (int i = 1; i < argc; i++) {
        char *end;
        long port = strtol(argv[i], &end, 10);
        if (*end || port < 1 || port > 65535) {
            fprintf(stderr, "app: bad port %s\n", argv[i]);
            return 2;
        }
        pfd[n].fd = listen_on((int)port);
        pfd[n++].events = POLLIN;
    }
    fprintf(stderr, "app: listening on %d port(s)\n", n);
    for (;;) {
        if (poll(pfd, (nfds_t)n, -1) < 0) continue;  /* EINTR */
        for (int i = 0; i < n; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            int fd = accept4(pfd[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0) continue;  /* ECONNABORTED, EMFILE, ...: keep serving */
            pid_t pid = fork();
            if (pid == 0) {
                for (int j = 0; j < n; j++) close(pfd[j].fd);
                serve(fd);
                close(fd);
                _exit(0);
            }
            close(fd);  /* parent (or failed fork: the client sees a reset) */
        }
    }
}
