"""A GPU machine without network: the wheels it lacks (wheels) and its one-command check (check: its machine, its
stages suite and benchmark, its report)."""
