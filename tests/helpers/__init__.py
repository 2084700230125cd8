"""Test-only helpers, no tests: shard writers (stream_helpers) and a zoo of broken data with a one-pass
stream over it (stream_zoo), synth configs and procedural view sets (synth), made-up batches (batches) and
image files (images), tiny exported pipelines (pipelines), the console-script runners and config composer
(cli; safety_runs for the safety tests), JeDiModule on in-memory sets (tiny_module), the W&B offline-run
reader, the CPU DeepSpeed shim, and fit_tiny.py, the multi-process fit script that test_distributed.py runs
by path.

Imported as `helpers.<module>`: pytest puts tests/ on sys.path (tests/ has no __init__.py), and
fit_tiny.py puts it there itself."""
