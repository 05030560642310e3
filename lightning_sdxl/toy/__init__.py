"""The toy world's trained assets: the teacher (VAE + UNet + text encoders), the FID feature
network and the CLIP-score model, each with the command that regenerates it, and the toy Table 2."""
