"""The method comparisons: one cell per method and seed (reproduce), and the gpu-proof sweep packed for a GPU
machine without network (gpu_proof)."""
