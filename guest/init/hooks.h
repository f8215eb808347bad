/* The executable lifecycle hooks of /mvm/init (hooks.c), run by the host through the agent's exec. */
#ifndef MVM_HOOKS_H
#define MVM_HOOKS_H

/* Run /etc/mvm/hooks/<event>.d/ in name order; 0 if all succeeded. */
int hooks_tool(const char *event);

#endif
