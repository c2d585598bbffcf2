"""Quality benchmark (issue 15): LoRA recipes of peft and lorakern on real pretrained weights and real text.

    python -m benchmarks.quality.run [--quick] [--tasks ...] [--recipes ...] [--seeds N] [--out DIR]

tasks.py builds the tasks (a registry), recipes.py the recipes (init + optimizer, a registry), run.py trains,
evaluates, and writes results.json, results.md and the figures.
"""
