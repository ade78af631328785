"""ExpertFlow as services: the gpu worker, predictor, expert store and orchestrator as separate processes.

Each service puts one of the in-process contracts behind gRPC (proto/expertflow/v1/, generated into
expertflow/v1/): the expert store serves `ExpertStore`, the predictor `SessionPredictor`, the orchestrator
`Prefetcher`, the worker the inference API. Deleting this package leaves a working embedded system.

Not for: any logic the embedded mode also needs (that lives below, in expert_store/, predictor/,
orchestrator/ and expertflow/); servicers here translate messages and call it.
"""
