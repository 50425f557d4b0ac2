"""Jobs: submission, the queue, the job state machine in the store, cancellation and the reaper."""
