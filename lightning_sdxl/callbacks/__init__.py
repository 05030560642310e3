"""Lightning callbacks: sample grids, metrics, exports, preemption checkpoints, RNG states, progress."""
