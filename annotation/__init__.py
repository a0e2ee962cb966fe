"""Annotating preference data with an ArmoRM: `armorm annotate` (`annotation.annotate`) reads prompts with candidate
answers in the layouts people publish (`annotation.layouts`), scores them through the shared-prefix path into
content-keyed shards (`annotation.scorers`, `annotation.shards`), makes DPO pairs (`annotation.pairs`) and uploads both
datasets with a card (`annotation.card`)."""
