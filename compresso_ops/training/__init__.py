"""The training machinery shared by the prune and fine-tune stages: data, batching, precision, model set-up,
checkpoints, the event log, the step loop, data parallelism and FSDP sharding."""
