"""Each VM's network services, kept together: its namespace and tap (`netns`), its egress policy
(`egress`) and the egress proxy that is the guest's only way out (`egress_proxy`).

The manager is handed the egress proxies at construction (`VmManager(settings, egress=...)`);
nothing here depends on the data plane.
"""
