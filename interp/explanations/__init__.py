"""Stage 6 (generate_descriptions.py): every denoising step of a completion, explained layer by layer.

The local replacement model (`replacement`), the attribution graph (`graph`), ablation and steering
(`interventions`), the explanation's score and its chance level (`score`), one step in numbers
(`step_analysis`), the words of an explanation (`wording`), the HTML report (`report`), circuit-tracer
graph files (`graph_export`), the stage (`stage`), its flags (`config`) and its command (`command`).
"""
