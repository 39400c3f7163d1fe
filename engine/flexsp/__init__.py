"""FlexSP: sequence-parallel groups of sizes 2^i formed afresh every step (Wang et al. 2024).

``cost`` predicts the time and memory of a sequence in a group of d ranks (compute, Ulysses
all-to-all, ring K/V traffic, a fixed cost per group) from the model config and a device file;
``planner`` buckets the step's lengths, solves a MILP (greedy fallback) for the group layout of
each micro-batch and the sequences of every group. The runtime that executes plans lives beside
them and is imported from its own module, never from here.
"""
