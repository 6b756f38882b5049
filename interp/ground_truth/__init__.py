"""The ground-truth benchmark on the synthetic corpus (`python -m interp.ground_truth`).

Collection and scoring at each noise level (`benchmark`), F1 and its controls (`counts`), k-sparse probes
(`probe`), whether a description names its category (`naming`) and the printed tables (`report`).
"""
