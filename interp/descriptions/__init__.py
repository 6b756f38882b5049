"""Stage 5 (get_activation_descriptions.py): a description of every feature, scored on held-out contexts.

The explain prompts and the `tokens` baseline (`prompts`), the scorers (`scoring`), the descriptions file
(`records`), the split audit (`audit`, `python -m interp.descriptions.audit`), the stage (`stage`), its flags
(`config`) and its command (`command`).
"""
