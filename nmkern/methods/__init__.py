"""Training and pruning methods, each built on nmkern's modules and kernels.

* :mod:`.srste` - SR-STE training of N:M layers (parametrizations on plain modules);
* :mod:`.domino` - DominoSearch, a layer-wise N:M scheme under a parameter / FLOPs budget;
* :mod:`.gap` - Gradual Pruning with partitions (S-GaP, P-GaP on torch.distributed);
* :mod:`.blockprune` - 1xN block pruning with filter rearrangement;
* :mod:`.oneshot` - one-shot pruning from calibration inputs (magnitude, Wanda, SparseGPT), on
  :mod:`.sparsegpt`'s per-layer math, with :mod:`.permute`'s channel permutations folded into
  producer layers; :mod:`.owl` - an outlier-weighted per-block N:M scheme for it; :mod:`.calibration` -
  calibration windows of a text;
* :mod:`.masking` - keep-mask bookkeeping the methods share;
* :mod:`.loop` - the one training / evaluation loop the methods and the CLI share.

Nothing below this package imports from it.
"""
