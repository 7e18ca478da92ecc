"""Data: the LLaVA reader, datasets over samples, the collator, the feature cache."""
