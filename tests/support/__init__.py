"""What the tests share: running the CLI (runs), the models and datasets loaded by import path (models),
and the helpers of each area (ddp, procs, proc_runs, memory, report, visdom_server). One import root:
`tests.support.X`, from the repository root (on sys.path in pytest and in every process a test starts)."""
