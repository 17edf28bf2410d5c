"""Curation of web image-text shards: make noisy copies for benchmarks (noise), score every pair with
a checkpoint (score), choose what to train on (select). Training reads a selection in place
(`data.select` / `data.sources[].select`, vlp.data.selection); nothing is resharded.

    python -m vlp.curate noise  SPEC OUT --rate 0.5          (benchmarks: the permuted-caption protocol)
    python -m vlp.curate score  SPEC OUT --checkpoint RUN    (also under torchrun)
    python -m vlp.curate select SCORES OUT --rule gmm|top|threshold ...
"""
