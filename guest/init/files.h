/* File tools of /mvm/init (files.c), run by the host through the agent's exec. */
#ifndef MVM_FILES_H
#define MVM_FILES_H

/* Run `tool` (file-get, file-put, file-delete) on `path`; returns the exit status (an errno, 0 on success). */
int files_tool(const char *tool, const char *path);

#endif
