"""The pipeline's stages, one module each. Every stage module exposes `run(recipe, run_dir, on_event) -> note`,
the one function the executor calls (see `executor.PIPELINE`)."""
