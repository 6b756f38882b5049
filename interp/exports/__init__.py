"""Exports of a run's features to other tools, each its own command writing under `experiments/X/exports/`:
circuit-tracer's transcoder set (`python -m interp.exports.circuit_tracer`), delphi's latent cache
(`python -m interp.exports.delphi`), SAELens folders (`python -m interp.exports.saelens`) and Neuronpedia's
import rows (`python -m interp.exports.neuronpedia`).
"""

from core.files import UserError


def refuse_unhooked_family(model_cfg: dict, tool: str, fields: str) -> None:
    """One line, before anything is written, when the run's model is not this project's own: `tool` names its base
    model by `fields`, a model and TransformerLens hooks it can run, which LLaDA and Dream runs do not have."""
    if (family := model_cfg.get("family", "diffusionlm")) != "diffusionlm":
        raise UserError(f"{tool} describes the base model by {fields}, a model and TransformerLens hooks it can run; "
                        f"this {family} run has none (its MLPs read a norm with a gain, which ln2.hook_normalized "
                        "is not): export the transcoders with python -m interp.exports.sparsify instead")
