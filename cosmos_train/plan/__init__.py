"""`cosmos-train plan`: per-rank memory, checkpoint sizes and a verdict for a spec, before launch.

`plan(spec, Hardware(...))` (planner.py) composes exact model-state bytes (model_states.py),
activations traced on the meta device (trace.py, standins.py) and FSDP2 buffer arithmetic;
`find_fixes` (fixes.py) re-plans candidate changes; report.py renders it; measure.py measures
the real peak for the validation benchmark.
"""
