"""What training and sampling both stand on: configs, checkpoints, distributed launch, the command-line entry point,
data loaders, and the frozen autoencoder's latents. Imports only datasets/, diffusion/ and models/."""
