"""A GPU machine without network: the wheels it lacks (wheels) and its one-command check (check)."""
