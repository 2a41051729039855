"""Training orchestration: Ray Data input, one step, one epoch, the Ray Train worker loop and its
driver, the in-process executor, checks on a finished model and per-epoch noise detection."""
