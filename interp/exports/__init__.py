"""Exports of a run's features to other tools, each its own command writing under `experiments/X/exports/`:
circuit-tracer's transcoder set (`python -m interp.exports.circuit_tracer`), delphi's latent cache
(`python -m interp.exports.delphi`), SAELens folders (`python -m interp.exports.saelens`) and Neuronpedia's
import rows (`python -m interp.exports.neuronpedia`).
"""
