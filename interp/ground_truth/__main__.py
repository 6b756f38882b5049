"""`python -m interp.ground_truth`: the benchmark's command line."""
from interp.ground_truth.benchmark import command

command()
