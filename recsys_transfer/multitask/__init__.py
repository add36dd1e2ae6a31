"""Multi-task pieces of the one training step (:mod:`recsys_transfer.train.step`): loss weighting
(:mod:`~recsys_transfer.multitask.weighting`: equal, fixed, uncertainty) and gradient surgery
(:mod:`~recsys_transfer.multitask.surgery`: PCGrad, GradVac over the shared dense parameters and the recorded
per-task row gradients). Torch only; models never see them."""
