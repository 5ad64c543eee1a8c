"""Process-level plumbing: torch.distributed (dist, launch, ddp, shuffle-BN), device and precision
selection, the progress display, and safetensors files with digests (safefile). Imports nothing
else of interclr but ``errors``."""
