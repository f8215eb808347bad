"""VM plane: real QEMU microVMs, their snapshots, namespaces, registry and policies."""
