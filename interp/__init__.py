"""Interpretability, one room per stage, each importing only the rooms below it:

    exports, ground_truth   other tools' formats; the synthetic corpus's benchmark
    explanations            stage 6: attribution graphs, interventions, explanations of each denoising step
    descriptions            stage 5: feature descriptions and their held-out scores
    contexts, generation    stage 4: each feature's top-activating contexts and the feature browser;
                            stage 2 (one module): step-by-step generation

Each room holds its stage's flags (`config`), its work (`stage`) and its command (`command`: `main(cfg)`
and the console script). The browser's and the report's CSS and scripts live in `contexts/assets/` and
`explanations/assets/`.
"""
