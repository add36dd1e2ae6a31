"""The fused row update: embedding rows touched by a batch are updated inside the step's backward phase, and no
dense ``[num_embeddings, D]`` table gradient ever exists.

Three stages, each in its own module:

1. :mod:`recsys_transfer.rows.lookup` -- the lookup kernel that replaces a TorchRec collection's (or a sharded
   lookup group's TBE) forward; its backward RECORDS, per table, the unique touched rows and their main-loss
   gradient ``g_i`` (:class:`~recsys_transfer.rows.pipeline.CallRows`), per task when the step asks for it;
2. :mod:`recsys_transfer.rows.pipeline` -- :class:`~recsys_transfer.rows.pipeline.RowPipeline` runs the registered
   row transforms on the records in a fixed order -- gradient surgery (combines the per-task gradients into one
   ``g_main``), the transfer barrier (:class:`recsys_transfer.transfer.barrier.TransferTransform`), freezing of
   chosen tables, optional clipping -- and
3. applies the resulting directions through the row optimizer (:mod:`recsys_transfer.optim.rowwise`), touched
   rows only, before the dense optimizer steps.

:func:`recsys_transfer.train.step.TrainStep` composes them; models and transforms do not know about each other.
"""
