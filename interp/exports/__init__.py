"""Exports of a run's features to other tools: circuit-tracer's transcoder files
(`python -m interp.exports.circuit_tracer`) and delphi's latent cache (`python -m interp.exports.delphi`).
"""
