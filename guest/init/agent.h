/*
 * The guest agent: the host's control channel into the VM, over the virtio-serial port
 * "mvm.agent". Only the host can reach it (a QEMU chardev on a root-only unix socket), and
 * only one process in the guest can hold the port open: this one, started by PID 1 before
 * the app. PID 1 restarts it if it dies.
 *
 * Frames, both ways: u32 length (big-endian; of what follows), u8 type, u32 channel, payload.
 * SYNC, SYNC_REKEY, EXEC and PTY_EXEC payloads start with the VM's 32-byte key: the first such
 * frame an agent sees sets it (a clone's agent wakes from the template's snapshot knowing none),
 * and every later one must carry the same key. A fork's child wakes knowing its parent's key: its
 * first sync is a SYNC_REKEY, and once that is answered only the new key is taken.
 */
#ifndef MVM_AGENT_H
#define MVM_AGENT_H

#include <stdint.h>

enum agent_frame {
    /* host -> guest */
    F_SYNC = 1,      /* u64 realtime ns, u16 hostname length, hostname, entropy bytes (rest) */
    F_SYNC_REKEY = 3, /* the VM's next 32-byte key, then as F_SYNC */
    F_EXEC = 10,     /* u32 uid, u32 gid, u16 argc, u16 envc, then argv, env, cwd: NUL-terminated */
    F_STDIN = 15,    /* bytes for the exec's stdin; empty closes it */
    F_KILL = 16,     /* u8 signal for the exec's process group */
    F_PTY_EXEC = 17, /* u16 rows, u16 cols, then as F_EXEC: the command gets a terminal (output is stdout) */
    F_RESIZE = 18,   /* u16 rows, u16 cols for an exec's terminal */
    /* guest -> host */
    F_SYNC_OK = 2,   /* u64 guest realtime ns after setting it, u8 flags (1 entropy added, 2 crng reseeded,
                        4 the next key taken) */
    F_STDOUT = 11,
    F_STDERR = 12,
    F_EXIT = 13,     /* i32: exit status, or -signal */
    F_ERROR = 14,    /* text */
};

#define AGENT_PORT_NAME "mvm.agent"
#define AGENT_MAX_FRAME (1u << 20)
#define AGENT_KEY_BYTES 32

/*
 * The egress proxy on the host's side of the tap (vmm/netns.py HOST_IP:EGRESS_PORT): the same
 * address in every VM's namespace, so a template's snapshot holds for all its clones. Init gives
 * these to the app unless the image's env sets them, and exports the values the app got so the
 * agent gives each exec the same unless the exec's own env sets them.
 */
#define PROXY_URL "http://10.77.0.1:3128"
#define NO_PROXY_HOSTS "localhost,127.0.0.1,::1"
#define PROXY_ENV_COUNT 6
extern const char *const proxy_env[PROXY_ENV_COUNT]; /* "NAME=default" */

/* 0: what the agent spawns runs without address-space randomisation (/mvm/config `exec_aslr off`, from the
 * image label mvm.exec.aslr): set by init before it forks the agent. */
extern int agent_exec_aslr;

/* Run the agent forever (in its own process). */
void agent_main(void);

#endif
