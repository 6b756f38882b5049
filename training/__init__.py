"""The two training loops (the diffusion model, the transcoders): above `experiment`, whose run
folders they write, and beside `interp/`. `loop` holds what both share, `config` the two stages' flags,
`diffusion_command` and `transcoders_command` their `main(cfg)` and console command."""
