"""Training a GliDe draft: prompt sources, the self-distilled corpus, target features, the loop."""
