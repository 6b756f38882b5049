"""The two training loops (the diffusion model, the transcoders): above `experiment`, whose run
folders they write, and beside `interp/`. `loop` holds what both share."""
