"""Diagnosis: rules over the event stream (findings), the files they leave, and `runner report`.

Nothing here imports torch at module level except `nonfinite`, which the trainer calls after a failure.
"""
