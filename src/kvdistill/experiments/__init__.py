"""kvdistill.experiments: runs composed of training and evaluation (the quickstart; controlled
comparisons)."""
