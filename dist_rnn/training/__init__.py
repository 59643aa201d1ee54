"""The training loop and its parts: steps, gradients, optimizers, schedules,
checkpoints and preemption.
"""
