"""Evaluation of DSLA models against their teacher.

- `metrics`: held-out perplexity (rows, or a long stream by sliding window), passkey retrieval, loss by distance;
- `ruler`: RULER's needle and variable-tracking tasks;
- `attention_maps`: the effective attention of each DSLA state, and the mixing weights (the paper's Figure 5);
- `suite`: `dsla eval`, every measure on several conversion ratios, with its report and plots;
- `ablation`: `dsla ablate`, the dual-state ablation grid.
"""
