/*
 * `/mvm/init hooks EVENT`: run the executables in /etc/mvm/hooks/EVENT.d/ in name order, for
 * apps without an HTTP server. The host runs this through the agent's exec and bounds it
 * with the hook's timeout (killing the whole process group). Exit 0 when every hook
 * succeeded (or there are none), else 1; each hook's output goes to this tool's output.
 */
#define _GNU_SOURCE
#include "hooks.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int hooks_tool(const char *event) {
    char dir[256];
    snprintf(dir, sizeof dir, "/etc/mvm/hooks/%s.d", event);
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    if (n < 0)
        return errno == ENOENT ? 0 : (fprintf(stderr, "cannot read %s: %s\n", dir, strerror(errno)), 1);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        char path[512];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        int runnable = names[i]->d_name[0] != '.' && stat(path, &st) == 0 && S_ISREG(st.st_mode) && !access(path, X_OK);
        free(names[i]);
        if (!runnable)
            continue;
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            execl(path, path, event, (char *)NULL);
            fprintf(stderr, "cannot run %s: %s\n", path, strerror(errno));
            _exit(127);
        }
        int status = 0;
        while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (pid < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "hook %s failed (status %d)\n", path, pid < 0 ? -1 : status);
            failed = 1;
        }
    }
    free(names);
    return failed;
}
