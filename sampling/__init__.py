"""From trained checkpoints to videos: load the three models, generate (class or caption -> content frame -> motion
latent -> video), write mp4/png/npz outputs. Used by sample.py, the training previews and the benchmarks."""
