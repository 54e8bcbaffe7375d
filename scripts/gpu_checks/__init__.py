"""The GPU acceptance run (issue 10): its checks, their judging (pure functions, tested on CPU with
recorded numbers), the bundle of wheels and assets the GPU machine lacks, and the report."""
