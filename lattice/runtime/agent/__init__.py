"""The elastic agent: one per node/pod; rendezvous, launch, monitor, restart, planned stops."""
