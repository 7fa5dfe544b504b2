"""Stage 3: fine-tune the top blocks end to end, with sweeps, lr_find and TTA."""
