"""vmmalloc's benchmarks: one module per benchmark, each measuring its peers in the same run."""
