"""Speed and memory tables: divergences (divergence), every method (methods), TRL beside okd_scale (peers)."""
