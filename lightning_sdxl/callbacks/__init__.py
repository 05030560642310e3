"""Lightning callbacks: validation sample grids, (later) metrics and exports."""
