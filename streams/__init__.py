"""Usage-event ingestion contract, meters and the faust workers that turn events into charge checkpoints."""
