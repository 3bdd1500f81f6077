"""Expert parallelism: the routing table, process groups and all-to-all dispatch/combine (no Ray here)."""
