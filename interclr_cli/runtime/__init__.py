"""Process-level plumbing: torch.distributed (dist, launch, ddp, shuffle-BN), device and precision
selection, and the progress display. Imports nothing else of interclr but ``errors``."""
