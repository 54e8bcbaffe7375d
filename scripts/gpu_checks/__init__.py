"""The GPU acceptance run (issues 10 and 22): the plan (plan.py), the checks (checks_*.py, each a real run
read back by readback.py), their judging (judge*.py: pure functions, tested on CPU with recorded numbers),
the evidence archive, the bundle of wheels and assets the GPU machine lacks, and the rehearsal without a
GPU (rehearse.py, replay.py, rehearsal.sh)."""
