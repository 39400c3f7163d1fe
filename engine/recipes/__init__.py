"""Post-training recipes (SFT, DPO): their losses and the step functions built on the engine."""
