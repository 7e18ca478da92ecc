"""Data: the readers (LLaVA format, data-set sources, mixtures), conversation formats and chat
encoding, datasets over samples, the collator and batcher, the feature cache, media inputs."""
