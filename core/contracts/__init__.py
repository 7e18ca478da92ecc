"""The contracts: what a plugin implements (the survey's four families, the encoder, the LLM,
data sets, scorers, tools) and the types they exchange."""
