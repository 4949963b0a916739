"""The training runtime the three scripts share: run folder, logging, resume, optimizer steps, EMA; the diffusion
stages' setup; checkpoint export (python -m training.export)."""
